"""Benchmark: the simulator's cost model against the real service on this machine, side by side.

One embedded Ray and one service serve a small random layer (H=64, I=48, E=8, K=2) from 2
ExpertHost actors; client threads here send [T, H] requests whose tokens sit near chosen
experts' gate rows (as bench/elastic.py does). Measured, then predicted by `moefleet.sim` for
the same shape and load (`CostConfig` defaults):

    p50 light     1 client, T=16, a pause of 50 ms between requests: p50 request latency
    p50 busy      3 clients, T=16, no pause: p50 request latency (sim: requests of 16 tokens
                  merged by the cost model's micro-batcher with the router's max_wait_ms and
                  max_batch_tokens; and, for reference, every request its own call)
    hot tokens/s  3 clients, T=64, no pause, every token's top expert the same one: that
                  expert's rows/s (sim: `expert_rows_per_s` at T rows per call)
    reaction      autoscaling on (period 0.5 s, upscale delay 1 s, smoothing 1): the load steps
                  onto one expert; from the step to the first answer served on a version with
                  its second replica (sim: the same step replayed as a trace through the
                  moefleet policy, to the period its second replica serves)

    .venv/bin/python bench/sim_calibrate.py        # about 1 to 2 minutes

# T = tokens per request, H = hidden, E = experts
"""

from __future__ import annotations

import statistics
import threading
import time
from functools import partial

import numpy as np
import ray
import torch
from elastic import near, wait_for  # bench/elastic.py: inputs near chosen gate rows

from moefleet.client import Client
from moefleet.cluster import service
from moefleet.cluster.spec import ModelSpec
from moefleet.sim import Fleet, Scenario, expert_rows_per_s, period_cost
from moefleet.testing import Reference

E, K, HOT, LAYER = 8, 2, 3, 0
PERIOD_S, UP_S = 0.5, 1.0


def make_spec() -> ModelSpec:
    return ModelSpec.from_dict({
        "name": "calib", "layers": [LAYER], "dtype": "float32",
        "moe": {"hidden_size": 64, "moe_intermediate_size": 48, "n_routed_experts": E,
                "num_experts_per_tok": K, "norm_topk_prob": True},
        "weights": {"random": {"seed": 0}},
        "hosts": {"count": 2, "max_count": 2, "num_cpus": 0.25, "slots": 8},
        "router": {"num_cpus": 0.25},
        "autoscaling": {"enabled": False, "smoothing": 1.0, "period_s": PERIOD_S, "max_replicas": 2,
                        "upscale_delay_s": UP_S, "downscale_delay_s": 1.0},
    })


def scenario(tokens: int, merge: bool = True) -> Scenario:
    router = make_spec().router
    return Scenario.from_dict({
        "name": "calib", "duration_s": 20, "hosts": {"count": 2, "max_count": 2, "slots": 8},
        "model": {"layers": 1, "n_routed_experts": E, "num_experts_per_tok": K, "hidden_size": 64,
                  "moe_intermediate_size": 48, "bytes_per_param": 4},
        "cost": {"batch_tokens": tokens, "max_batch_tokens": router.max_batch_tokens,
                 "max_wait_ms": router.max_wait_ms if merge else 0.0},
        "autoscaling": {"smoothing": 1.0, "period_s": PERIOD_S, "max_replicas": 2, "upscale_delay_s": UP_S,
                        "downscale_delay_s": 1.0, "target_tokens_per_s": 1.0},
        "policies": [{"name": "deployed", "kind": "static", "replicas": E},  # one replica each
                     {"name": "moefleet", "kind": "autoscale"}]})


# ---- measured ----------------------------------------------------------------------------


def drive(address: str, make_x, threads: int, pause_s: float,
          seconds: float) -> list[tuple[float, float, int]]:
    """`threads` clients for `seconds` -> [(monotonic end, latency s, routing version)]."""
    out: list[tuple[float, float, int]] = []
    stop = time.monotonic() + seconds

    def client(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with Client(address, retries=0) as c:
            while time.monotonic() < stop:
                x = make_x(g)
                t0 = time.monotonic()
                _, version = c.infer_with_version("calib", LAYER, x, timeout_s=30)
                out.append((time.monotonic(), time.monotonic() - t0, version))
                time.sleep(pause_s)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return out


def measure(svc, rows: torch.Tensor) -> dict:
    uniform = torch.full((E,), 1.0 / E)
    hot = torch.nn.functional.one_hot(torch.tensor(HOT), E).float()
    out = {}
    light = drive(svc.address, partial(near, rows, uniform, 16), 1, 0.05, 8)
    out["p50_light"], out["rate_light"] = statistics.median(r[1] for r in light), len(light) * 16 / 8
    busy = drive(svc.address, partial(near, rows, uniform, 16), 3, 0.0, 8)
    out["p50_busy"], out["rate_busy"] = statistics.median(r[1] for r in busy), len(busy) * 16 / 8
    sat = drive(svc.address, partial(near, rows, hot, 64), 3, 0.0, 8)
    out["hot_rows_s"] = len(sat) * 64 / 8
    with Client(svc.address) as c:
        c.set_autoscaling("calib", enabled=True, target_tokens_per_s=2 * out["rate_light"] * K / E)
        t_step = [time.monotonic()]
        res: list = []
        th = threading.Thread(target=lambda: res.extend(drive(svc.address, partial(near, rows, hot, 16),
                                                              1, 0.05, 12)))
        th.start()
        version = wait_for(lambda: _hot_version(c), 20, 0.02)
        th.join()
        served = [t for t, _, v in res if version and v >= version]
        out["reaction_s"] = (min(served) - t_step[0]) if served else float("nan")
        c.set_autoscaling("calib", enabled=False)
    return out


def _hot_version(c: Client) -> int:
    (m,) = c.status("calib").models
    e = next(e for L in m.layers for e in L.experts if e.expert == HOT)
    return m.routing_version if len(e.replicas) >= 2 else 0


# ---- simulated ---------------------------------------------------------------------------


def simulate_p50(rate_tokens_s: float, tokens: int, merge: bool = True) -> float:
    """One layer, uniform experts at rate_tokens_s tokens/s in requests of `tokens` tokens."""
    sc = scenario(tokens, merge)
    rate = np.full(E, rate_tokens_s * K / E)
    f = Fleet(sc, sc.policies[0], rate)
    return float(period_cost(sc.cost, sc.model, f.layout, rate).latency_s[0])


def simulate_reaction(rate_tokens_s: float) -> float:
    """The step from uniform to one hot expert (its top-1 rows plus uniform second picks)."""
    sc = scenario(16)
    sc.autoscaling.target_tokens_per_s = 2 * rate_tokens_s * K / E
    uniform = np.full(E, rate_tokens_s * K / E)
    hot = np.full(E, rate_tokens_s / (E - 1))
    hot[HOT] = rate_tokens_s
    f = Fleet(sc, next(p for p in sc.policies if p.kind == "autoscale"), uniform)
    for i in range(4):
        f.step((i + 1) * PERIOD_S, uniform)
    t_step = 4 * PERIOD_S
    for i in range(4, 60):
        t = (i + 1) * PERIOD_S
        f.step(t, hot)
        if f.loading and len(f.placement[(0, HOT)]) >= 2:
            return f.ready_at - t_step  # its weights are in: it serves from here
    return float("nan")


def main() -> None:
    print(time.strftime("%Y-%m-%d %H:%M %Z"), flush=True)
    service.connect_ray("local", num_cpus=4)
    svc = service.start(make_spec(), port=0)
    try:
        w = Reference(make_spec()).gates[LAYER].weight
        m = measure(svc, w / w.norm(dim=1, keepdim=True))
    finally:
        svc.shutdown()
        ray.shutdown()
    sc = scenario(64)
    m["p50_busy_unmerged"] = m["p50_busy"]
    sim = {"p50_light": simulate_p50(m["rate_light"], 16), "p50_busy": simulate_p50(m["rate_busy"], 16),
           "p50_busy_unmerged": simulate_p50(m["rate_busy"], 16, merge=False),
           "hot_rows_s": expert_rows_per_s(sc.cost, sc.model, 64),
           "reaction_s": simulate_reaction(m["rate_light"])}
    print(f"load: light {m['rate_light']:.0f} tokens/s, busy {m['rate_busy']:.0f} tokens/s")
    print("| quantity | measured | simulated | simulated / measured |\n|---|---:|---:|---:|")
    for name, label, scale in (("p50_light", "p50 light (ms)", 1e3),
                               ("p50_busy", "p50 busy (ms), sim: micro-batcher", 1e3),
                               ("p50_busy_unmerged", "p50 busy (ms), sim: no merging", 1e3),
                               ("hot_rows_s", "hot expert rows/s", 1), ("reaction_s", "reaction (s)", 1)):
        print(f"| {label} | {m[name] * scale:.3g} | {sim[name] * scale:.3g} | {sim[name] / m[name]:.2f} |")


if __name__ == "__main__":
    main()
