"""The cost model: what one period of load costs on a given placement. Pure numpy.

Clients send requests of `batch_tokens` tokens; the router's micro-batcher merges those that
arrive while a call of their layer is in flight (`merged_tokens`), so a layer call carries b_l
tokens and layer l gets calls_l = tokens/s into layer l / b_l calls per second. A replica r of
expert k on host h gets n_r = rows_k / (replicas_k · calls_l) rows per call on average, and
takes (roofline)

    t_r = max(n_r · flops_per_row / tflops,  (1 − e^(−n_r)) · expert_bytes / hbm_gbps)

(an expert with no rows in a call reads no weights; e^(−n_r) is that chance for Poisson rows).
Host h's part of one call of layer l, when it is called at all (chance P_hl = 1 − e^(−Σ n_r)):

    s_hl = (P_hl · call_overhead_s + Σ_r t_r + 2 · Σ_r n_r · H · activation_bytes / net_gbps) / P_hl

Its utilisation is ρ_h = Σ_l calls_l · P_hl · s_hl. Each host is an M/D/1 queue (Poisson calls,
deterministic service at its mean S_h): the mean wait is W_h = ρ_h · S_h / (2 (1 − ρ_h)),
infinite at ρ_h >= 1. A layer call waits for its slowest host:

    latency_l = net_latency_s + max_h (s_hl + W_h)

The per-(host, layer) terms depend on the placement and on the rows per call only, not on the
rate's scale: `profile` computes them once (O(R)), `evaluate` then costs a period in O(H · L).
A replica being loaded serves nothing for expert_bytes / load_gbps seconds (`load_s`). It
knows nothing of policies, time or where load comes from.

    L = layers, E = experts per layer, N = L·E, R = replicas, H = hosts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moefleet.cluster.placement import Placement

from .scenario import CostConfig, ModelShape

_MERGE_ROUNDS = 8  # period_cost: latency -> merged calls -> latency ..., to a fixed point

__all__ = ["Layout", "PeriodCost", "Profile", "layout", "rows_per_call", "rows_given_calls", "layer_calls",
           "layer_tokens", "merged_tokens", "profile", "evaluate", "period_cost", "load_s",
           "expert_rows_per_s"]


@dataclass(frozen=True)
class Layout:
    """A placement as arrays: replica r holds expert key[r] (n index) on host host[r]."""

    key: np.ndarray  # [R] int
    host: np.ndarray  # [R] int, an index into `hosts`
    count: np.ndarray  # [N] replicas per expert
    hosts: list[str]  # the hosts in use, in index order


@dataclass(frozen=True)
class PeriodCost:
    """One period's cost ([..., ] leading: one per period of several, from one profile)."""

    latency_s: np.ndarray  # [..., L] mean latency of one call of each layer (inf: a host saturated)
    host_rows: np.ndarray  # [..., H] rows/s each host serves
    utilisation: np.ndarray  # [..., H] busy share of each host


@dataclass(frozen=True)
class Profile:
    """What one call of each layer costs each host, for one layout and one pattern of rows per
    call (which the rate's scale leaves alone): per (host, layer), each [H, L]."""

    busy: np.ndarray  # expected s per layer call: hit · call_overhead_s + work + wire
    hit: np.ndarray  # chance a call of the layer reaches the host
    rows: np.ndarray  # rows per call of the layer
    called: np.ndarray  # bool: hit > 0
    per_hit: np.ndarray  # busy / hit where called: the host's part of a call that reaches it
    part: np.ndarray  # per_hit where called, -inf elsewhere (what `evaluate` takes the max of)


def layout(placement: Placement, hosts: list[str], m: ModelShape) -> Layout:
    """placement (layer, expert) -> [host] -> arrays; `hosts` are every host in use (even empty)."""
    index = {h: i for i, h in enumerate(hosts)}
    E = m.n_routed_experts
    key = np.array([L * E + e for (L, e), hs in placement.items() for _ in hs], dtype=np.int64)
    host = np.array([index[h] for hs in placement.values() for h in hs], dtype=np.int64)
    return Layout(key, host, np.bincount(key, minlength=m.layers * E), list(hosts))


def rows_per_call(cfg: CostConfig, m: ModelShape, rate: np.ndarray,
                  tokens_per_call: np.ndarray | float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """rate: [..., N] rows/s; tokens_per_call: [..., L] (default: cfg.batch_tokens, no merging)
    -> (x [..., N] rows each expert gets per call of its layer, calls [..., L] calls/s per layer)."""
    calls = layer_calls(cfg, m, rate, tokens_per_call)
    return rows_given_calls(m, rate, calls), calls


def layer_calls(cfg: CostConfig, m: ModelShape, rate: np.ndarray,
                tokens_per_call: np.ndarray | float | None = None) -> np.ndarray:
    """`rows_per_call`'s calls: rate [..., N] rows/s -> [..., L] calls/s per layer."""
    b = cfg.batch_tokens if tokens_per_call is None else tokens_per_call
    return layer_tokens(m, rate) / b


def rows_given_calls(m: ModelShape, rate: np.ndarray, calls: np.ndarray) -> np.ndarray:
    """`rows_per_call`'s x from its calls: rate [..., N], calls [..., L] -> x [..., N]. Row by
    row it gives what it gives for the rows together (each element is its own division)."""
    r = rate.reshape(*rate.shape[:-1], m.layers, m.n_routed_experts)  # [..., L, E]
    c = calls[..., None]  # [..., L, 1]
    if (calls > 0).all():
        x = r / c
    else:  # a layer without calls: its experts get no rows
        x = np.divide(r, c, out=np.zeros_like(r), where=c > 0)
    return x.reshape(rate.shape)


def layer_tokens(m: ModelShape, rate: np.ndarray) -> np.ndarray:
    """rate: [..., N] rows/s -> [..., L] tokens/s into each layer (a token is top-k rows)."""
    return rate.reshape(*rate.shape[:-1], m.layers, m.n_routed_experts).sum(axis=-1) / m.num_experts_per_tok


def merged_tokens(cfg: CostConfig, tokens_per_s: np.ndarray, latency_s: np.ndarray) -> np.ndarray:
    """The router's micro-batcher: tokens_per_s, latency_s: [L] -> tokens per call of each layer.

    Requests of batch_tokens arrive as a Poisson stream, λ = tokens_per_s / batch_tokens per s,
    and a call takes S = latency_s. A request that finds no call of its layer in flight (chance
    e^(−c·S) at c calls/s) goes at once, alone; one that finds one waits W = min(max_wait_ms, S)
    and goes with the requests that arrive meanwhile, n = 1 + λ·W of them (at most
    max_batch_tokens). So c = λ·e^(−c·S) + λ·(1 − e^(−c·S)) / n, solved by bisection
    (c - f(c) grows with c), and a call carries tokens_per_s / c tokens.
    """
    r = cfg.batch_tokens
    lam = tokens_per_s / r  # [L] requests/s
    S = np.minimum(latency_s, 1e6)  # a saturated layer (inf) is always in flight
    n = np.clip(1 + lam * np.minimum(cfg.max_wait_ms / 1e3, S), 1, max(cfg.max_batch_tokens / r, 1))
    lo, hi = lam / n, lam.copy()  # [L] c lies between: all merged, none merged
    for _ in range(40):
        c = (lo + hi) / 2
        p = np.exp(-c * S)  # chance no call is in flight
        above = c > lam * (p + (1 - p) / n)
        hi, lo = np.where(above, c, hi), np.where(above, lo, c)
    c = (lo + hi) / 2
    return np.divide(tokens_per_s, c, out=np.full_like(c, float(r)), where=c > 0)


def profile(cfg: CostConfig, m: ModelShape, lay: Layout, x: np.ndarray) -> Profile:
    """x: [N] rows per call of each expert's layer (`rows_per_call`) -> its Profile on `lay`."""
    L, E, H = m.layers, m.n_routed_experts, len(lay.hosts)
    if lay.count.min(initial=1) > 0:  # every expert has a replica (the policies keep one)
        n = x / lay.count  # [N] rows per replica
    else:
        n = np.divide(x, lay.count, out=np.zeros_like(x), where=lay.count > 0)
    # t = max(n · flops_per_row / FLOP/s, (1 − e^(−n)) · expert_bytes / B/s): [N] s per call,
    # the same operations in the same order, in two buffers
    t = n * m.flops_per_row
    t /= cfg.tflops * 1e12
    w = np.negative(n)
    np.expm1(w, out=w)
    np.negative(w, out=w)
    w *= m.expert_bytes
    w /= cfg.hbm_gbps * 1e9
    np.maximum(t, w, out=t)
    idx = lay.host * L  # [R] (host, layer) cell
    idx += lay.key >> (E.bit_length() - 1) if E & (E - 1) == 0 else lay.key // E  # a shift: 6x a division
    work = np.bincount(idx, weights=t[lay.key], minlength=H * L).reshape(H, L)
    rows = np.bincount(idx, weights=n[lay.key], minlength=H * L).reshape(H, L)
    hit = -np.expm1(-rows)  # [H, L]
    wire = 2 * rows * m.hidden_size * cfg.activation_bytes / (cfg.net_gbps * 1e9)
    busy = hit * cfg.call_overhead_s + work + wire
    called = hit > 0
    with np.errstate(divide="ignore", invalid="ignore"):  # where not called: masked next
        q = busy / hit
    return Profile(busy, hit, rows, called, np.where(called, q, 0.0), np.where(called, q, -np.inf))


def evaluate(cfg: CostConfig, prof: Profile, calls: np.ndarray) -> PeriodCost:
    """calls: [..., L] calls/s of each layer, a row per period -> the periods' cost, O(H · L)
    each, not O(replicas). A row costs to the bit what it costs alone: its products are one
    matrix-vector product each, as for a lone [L], and the rest is elementwise."""
    c = calls[..., None]  # [..., L, 1]
    rho = np.matmul(prof.busy, c)[..., 0]  # [..., H]
    host_calls = np.matmul(prof.hit, c)[..., 0]  # [..., H] calls/s that reach the host
    mean_s = np.divide(rho, host_calls, out=np.zeros_like(rho), where=host_calls > 0)
    if _max(rho, axis=None, initial=0.0) < 1:  # no host saturated: every wait is finite
        wait = rho * mean_s / (2 * (1 - rho))  # [..., H] M/D/1
        s = prof.part + wait[..., None]  # [..., H, L], -inf where not called
    else:  # the same values where no host is saturated (a called part is >= 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            wait = np.where(rho < 1, rho * mean_s / (2 * (1 - rho)), np.inf)
        s = np.where(prof.called, prof.per_hit + wait[..., None], 0.0)
    latency = _max(s, axis=-2, initial=0.0)  # what s.max(axis=-2, ...) does, without its Python wrapper
    latency += cfg.net_latency_s
    return PeriodCost(latency, np.matmul(prof.rows, c)[..., 0], rho)


_max = np.maximum.reduce


def period_cost(cfg: CostConfig, m: ModelShape, lay: Layout, rate: np.ndarray) -> PeriodCost:
    """rate: [N] rows/s routed to each expert -> its cost on `lay` (`profile` then `evaluate`),
    with the micro-batcher's merging (`merged_tokens`) iterated to a fixed point.

    An expert with no replica drops its rows (they are counted nowhere; policies keep one)."""
    tokens, b = layer_tokens(m, rate), None
    for _ in range(_MERGE_ROUNDS if cfg.max_wait_ms > 0 else 1):
        x, calls = rows_per_call(cfg, m, rate, b)
        cost = evaluate(cfg, profile(cfg, m, lay, x), calls)
        b = merged_tokens(cfg, tokens, cost.latency_s)
    return cost


def load_s(cfg: CostConfig, m: ModelShape) -> float:
    """Seconds to load one replica's weights into a slot."""
    return m.expert_bytes / (cfg.load_gbps * 1e9)


def expert_rows_per_s(cfg: CostConfig, m: ModelShape, rows_per_call: float) -> float:
    """Rows/s one replica serves when every call brings it `rows_per_call` rows (roofline plus
    the per-call overhead)."""
    t = max(rows_per_call * m.flops_per_row / (cfg.tflops * 1e12), m.expert_bytes / (cfg.hbm_gbps * 1e9))
    return rows_per_call / (t + cfg.call_overhead_s)
