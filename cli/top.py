"""`moefleet top`: one frame of the live view, rendered from an admin `StatusResponse`.

Each model gets a heatmap: a row per layer, a cell per expert, shaded by its tokens/s
relative to the hottest expert; a second grid gives each expert's replica count. Then the
hosts with their slot use. Pure text; the command refreshes it.
"""

from __future__ import annotations

__all__ = ["render", "SHADES"]

SHADES = " .:-=+*#%@"  # cold → hot


def render(status, width: int = 120) -> str:
    lines = []
    for m in status.models:
        lines += _model(m, width)
    lines.append(f"{'HOST':<28} {'NODE':<16} {'DEVICE':<8} SLOTS")
    for h in status.hosts:
        lines.append(f"{h.id:<28} {h.node_ip:<16} {h.device:<8} {_bar(h.slots_used, h.slots_total)} "
                     f"{h.slots_used}/{h.slots_total}")
    return "\n".join(lines)


def _model(m, width: int) -> list[str]:
    hottest = max((e.tokens_per_s for L in m.layers for e in L.experts), default=0.0)
    total = sum(e.tokens_per_s for L in m.layers for e in L.experts)
    out = [f"MODEL {m.name}  routing_version={m.routing_version}  "
           f"autoscaling={'on' if m.autoscaling.enabled else 'off'}  "
           f"tokens/s={total:.0f}  requests/s={m.requests_per_s:.1f}  "
           f"p50={m.latency_p50_s * 1e3:.1f}ms  p99={m.latency_p99_s * 1e3:.1f}ms",
           f"  load (scale '{SHADES}', hottest = {hottest:.0f} tokens/s)    replicas per expert"]
    cells = max(8, (width - 20) // 2)
    for L in m.layers:
        experts = L.experts[:cells]
        heat = "".join(_shade(e.tokens_per_s, hottest) for e in experts)
        reps = "".join(_digit(len(e.replicas)) for e in experts)
        more = f" +{len(L.experts) - cells}" if len(L.experts) > cells else ""
        out.append(f"  L{L.layer:<4} {heat:<{len(experts)}}  {reps}{more}")
    return out


def _shade(tokens_per_s: float, hottest: float) -> str:
    if hottest <= 0 or tokens_per_s <= 0:
        return SHADES[0]
    return SHADES[max(1, min(len(SHADES) - 1, round(tokens_per_s / hottest * (len(SHADES) - 1))))]


def _digit(n: int) -> str:
    return str(n) if n < 10 else "+"


def _bar(used: int, total: int, width: int = 20) -> str:
    filled = round(width * used / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"
