"""Autoscaling policy: how many replicas each logical expert should have, and which idle hosts
to retire. Pure functions over plain data, after Ray Serve's `autoscaling_policy.py`.

Each period the Controller smooths the measured rates (`smooth`: the one rate that the policy,
placement and `status` all see), builds a `Snapshot` (smoothed tokens/s and ready replicas per
expert, replicas per live host), calls `decide(snapshot, state, now)` and carries out the
returned `Decision` through the placement planner and executor. The clock is injected (`now`, seconds)
and the policy's memory (`PolicyState`) is passed in and handed back, never kept here, so the
Controller can journal it and a restart loses nothing.

It deliberately does not know where replicas go, how many slots a host has, or how a replica is
started or drained (placement and the executor), nor anything about Ray. It does not look at
`AutoscalingConfig.enabled`: that switch tells the Controller whether to call `decide` at all.

    key = (layer, expert id); rates are tokens/s; times are seconds on one clock across calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Key", "AutoscalingConfig", "Snapshot", "PolicyState", "Decision", "desired_replicas", "decide",
           "ExpertState", "expert_targets", "idle_hosts", "smooth", "retirable"]

Key = tuple[int, int]  # (layer, expert id)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass
class AutoscalingConfig:
    """The model spec's `autoscaling:` block (YAML maps one to one onto it)."""

    enabled: bool = False
    target_tokens_per_s: float = 2000.0  # per replica
    min_replicas: int = 1
    max_replicas: int = 4
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0
    smoothing: float = 0.5  # weight of the newest rate in the moving average of `smooth` (1 = none)
    period_s: float = 1.0  # how often the Controller runs decide()
    host_idle_s: float = 60.0  # retire a host that has held no replica for this long
    # Rebalance's balance-vs-moves knob when a call does not set it (see admin.proto):
    rebalance_max_moves: int = 0  # most replicas moved per rebalance; 0 = no limit
    rebalance_min_gain: float = 0.0  # least drop in per-host max/mean worth one move
    # Consolidation (placement.hosts_to_drain, placement.drain): empty lightly used hosts to retire
    consolidate_max_moves: int = 0  # most replicas migrated per period to empty hosts; 0 = never
    consolidate_spare: float = 0.2  # share of the staying hosts' slots left free after a drain

    def __post_init__(self):
        # every comparison with NaN is false, so a NaN fails its check too
        _check(self.target_tokens_per_s > 0, "autoscaling.target_tokens_per_s must be > 0")
        _check(self.min_replicas >= 1, "autoscaling.min_replicas must be >= 1")
        _check(self.max_replicas >= self.min_replicas, "autoscaling.max_replicas must be >= min_replicas")
        for name in ("upscale_delay_s", "downscale_delay_s", "host_idle_s"):
            _check(getattr(self, name) >= 0, f"autoscaling.{name} must be >= 0")
        _check(0 < self.smoothing <= 1, "autoscaling.smoothing must be in (0, 1]")
        _check(self.period_s > 0, "autoscaling.period_s must be > 0")
        _check(self.rebalance_max_moves >= 0, "autoscaling.rebalance_max_moves must be >= 0")
        _check(0 <= self.rebalance_min_gain < math.inf,
               "autoscaling.rebalance_min_gain must be finite and >= 0")
        _check(self.consolidate_max_moves >= 0, "autoscaling.consolidate_max_moves must be >= 0")
        _check(0 <= self.consolidate_spare < 1, "autoscaling.consolidate_spare must be in [0, 1)")


@dataclass(frozen=True)
class Snapshot:
    """What the Controller measured this period."""

    config: AutoscalingConfig
    tokens_per_s: dict[Key, float]  # per logical expert, smoothed (`smooth`) over the periods so far
    replicas: dict[Key, int]  # ready replicas now, per logical expert (the set of experts that exist)
    host_replicas: dict[str, int]  # replicas each live host holds now (0 = empty)


@dataclass
class PolicyState:
    """The policy's memory between calls; plain data for the Controller to persist."""

    pending: dict[Key, tuple[int, float]] = field(default_factory=dict)  # key -> (wanted replicas, since)
    host_empty_since: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """Target counts, not deltas: repeating a decision that is already in flight is harmless."""

    replicas: dict[Key, int]  # only experts whose replica count should change now -> new count
    retire_hosts: list[str]  # empty hosts idle for host_idle_s or more (sorted)


# ---------------------------------------------------------------------------------------------
# per expert


def desired_replicas(tokens_per_s: float, cfg: AutoscalingConfig) -> int:
    """ceil(tokens_per_s / target_tokens_per_s), clamped to [min_replicas, max_replicas]."""
    if not tokens_per_s > 0:  # no load (or NaN)
        return cfg.min_replicas
    n = math.ceil(min(tokens_per_s / cfg.target_tokens_per_s, cfg.max_replicas))  # min(): inf is safe
    return max(cfg.min_replicas, n)


@dataclass
class ExpertState:
    """The per-expert part of `PolicyState` as arrays over one fixed order of keys [N], for
    callers that run the policy at scale (the simulator). `decide` converts to and from it."""

    pending_n: np.ndarray  # [N] the wished-for count; 0: nothing pending
    pending_since: np.ndarray  # [N] since when (s)

    @classmethod
    def empty(cls, n: int) -> ExpertState:
        return cls(np.zeros(n, dtype=np.int64), np.zeros(n))


def expert_targets(
    cfg: AutoscalingConfig, tokens_per_s: np.ndarray, current: np.ndarray, state: ExpertState, now: float
) -> tuple[np.ndarray, ExpertState]:
    """One period for every expert at once: tokens_per_s (smoothed), current: [N] -> (replicas
    to have now [N], the next state). Per expert it wants `desired_replicas` of the rate, clamps
    a count outside [min, max] at once, and moves towards the wish only once it has pointed the
    same way for that direction's delay. `state` is not modified."""
    # where the rate is <= 0 or NaN (fmax skips it) this gives min_replicas, as desired_replicas does;
    # kept as floats (whole numbers in [min, max]): compared with the int counts as they are, and only
    # the M that differ are made ints
    desired = np.asarray(tokens_per_s, dtype=np.float64) / cfg.target_tokens_per_s
    np.minimum(desired, cfg.max_replicas, out=desired)
    np.ceil(desired, out=desired)
    np.fmax(desired, cfg.min_replicas, out=desired)
    base = np.asarray(current, dtype=np.int64)
    if _min(base, initial=cfg.min_replicas) < cfg.min_replicas or _max(base, initial=0) > cfg.max_replicas:
        base = np.clip(base, cfg.min_replicas, cfg.max_replicas)
    # only the experts whose wish differs from their count can fire or wait; the rest keep it
    n = np.flatnonzero(desired != base)  # [M]
    want, have, pn = desired[n].astype(np.int64), base[n], state.pending_n[n]  # [M]
    up = want > have
    same_way = (pn > 0) & ((pn > have) == up) & (pn != have)
    since = np.where(same_way, state.pending_since[n], now)
    fire = now - since >= np.where(up, cfg.upscale_delay_s, cfg.downscale_delay_s)
    target = base.copy()
    target[n[fire]] = want[fire]
    wait = ~fire
    pending_n, pending_since = np.zeros(len(base), dtype=np.int64), np.zeros(len(base))
    pending_n[n[wait]], pending_since[n[wait]] = want[wait], since[wait]
    return target, ExpertState(pending_n, pending_since)


_max, _min, _sum = np.maximum.reduce, np.minimum.reduce, np.add.reduce


# ---------------------------------------------------------------------------------------------
# per host


def idle_hosts(cfg: AutoscalingConfig, host_replicas: dict[str, int], empty_since: dict[str, float],
               now: float) -> tuple[list[str], dict[str, float]]:
    """-> (hosts empty for host_idle_s or more, sorted; the next host -> empty since). Hosts
    that hold replicas or are gone drop out of `empty_since`."""
    since = {h: empty_since.get(h, now) for h, n in host_replicas.items() if n == 0}
    return sorted(h for h, t in since.items() if now - t >= cfg.host_idle_s), since


# ---------------------------------------------------------------------------------------------
# policy


def decide(snapshot: Snapshot, state: PolicyState, now: float) -> tuple[Decision, PolicyState]:
    """One period: snapshot + state + clock -> (what to change now, the next state).

    Experts missing from `snapshot.tokens_per_s` had no load (0 tokens/s). Experts missing from
    `snapshot.replicas` no longer exist and drop out of the state; new ones start fresh.
    `state` is not modified.
    """
    keys = list(snapshot.replicas)
    pending = [state.pending.get(k) for k in keys]
    arrays = ExpertState(
        np.array([p[0] if p else 0 for p in pending], dtype=np.int64),
        np.array([p[1] if p else 0.0 for p in pending], dtype=np.float64))
    current = [snapshot.replicas[k] for k in keys]
    rates = np.array([snapshot.tokens_per_s.get(k, 0.0) for k in keys], dtype=np.float64)
    target, nxt = expert_targets(snapshot.config, rates, np.array(current, dtype=np.int64), arrays, now)
    changes = {k: t for k, t, c in zip(keys, target.tolist(), current, strict=True) if t != c}
    pending_out = {k: (n, t) for k, n, t in zip(keys, nxt.pending_n.tolist(), nxt.pending_since.tolist(),
                                                  strict=True) if n}
    retire, empty_since = idle_hosts(snapshot.config, snapshot.host_replicas, state.host_empty_since, now)
    return Decision(changes, retire), PolicyState(pending_out, empty_since)


# ---------------------------------------------------------------------------------------------
# around the policy: what the Controller (and the simulator, moefleet.sim) do with each period


def smooth(weight: float, tokens_per_s: np.ndarray, old: np.ndarray | None) -> np.ndarray:
    """The one smoothing step: measured tokens/s [N] and the last smoothed rates [N] (NaN where
    an expert has none yet; None: none has) -> weight · rate + (1 − weight) · old, or the rate
    itself where old is NaN. A negative or non-finite rate is a reporting bug and counts as 0.
    `weight` is `AutoscalingConfig.smoothing`. Neither input is modified."""
    x = np.asarray(tokens_per_s, dtype=np.float64)
    # the ufuncs' own reduce: .min() adds a Python wrapper per call; NaN fails both tests
    if not (_min(x, initial=0.0) >= 0 and _max(x, initial=0.0) < np.inf):
        x = np.where(np.isfinite(x) & (x > 0), x, 0.0)
    if old is None:
        return x + 0.0  # a copy, and -0.0 gives +0.0
    out = x * weight
    out += (1 - weight) * old
    # old NaN makes out NaN (x is finite), and a NaN makes the sum NaN: a sum that is not NaN
    # says no old is, in one pass (one that is, from inf · 0 too, checks old itself)
    if np.isnan(_sum(out)):
        nan = np.isnan(old)
        out[nan] = x[nan] + 0.0
    return out


def retirable(retire_hosts: list[str], host_replicas: dict[str, int], min_hosts: int) -> list[str]:
    """Of the hosts `decide` says to retire, those to end now: still empty, in order, while more
    than `min_hosts` (the spec's hosts.count) of `host_replicas`' hosts remain."""
    left, out = len(host_replicas), []
    for h in retire_hosts:
        if left > min_hosts and host_replicas.get(h) == 0:
            out.append(h)
            left -= 1
    return out
