"""Autoscaling policy: how many replicas each logical expert should have, and which idle hosts
to retire. Pure functions over plain data, after Ray Serve's `autoscaling_policy.py`.

Each period the Controller builds a `Snapshot` (measured tokens/s and ready replicas per expert,
replicas per live host), calls `decide(snapshot, state, now)` and carries out the returned
`Decision` through the placement planner and executor. The clock is injected (`now`, seconds)
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

__all__ = ["Key", "AutoscalingConfig", "Snapshot", "PolicyState", "Decision", "desired_replicas", "decide",
           "LOAD_SMOOTHING", "smooth_load", "retirable"]

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
    smoothing: float = 0.5  # weight of the newest sample in an exponential moving average (1 = none)
    period_s: float = 1.0  # how often the Controller runs decide()
    host_idle_s: float = 60.0  # retire a host that has held no replica for this long

    def __post_init__(self):
        # every comparison with NaN is false, so a NaN fails its check too
        _check(self.target_tokens_per_s > 0, "autoscaling.target_tokens_per_s must be > 0")
        _check(self.min_replicas >= 1, "autoscaling.min_replicas must be >= 1")
        _check(self.max_replicas >= self.min_replicas, "autoscaling.max_replicas must be >= min_replicas")
        for name in ("upscale_delay_s", "downscale_delay_s", "host_idle_s"):
            _check(getattr(self, name) >= 0, f"autoscaling.{name} must be >= 0")
        _check(0 < self.smoothing <= 1, "autoscaling.smoothing must be in (0, 1]")
        _check(self.period_s > 0, "autoscaling.period_s must be > 0")


@dataclass(frozen=True)
class Snapshot:
    """What the Controller measured this period."""

    config: AutoscalingConfig
    tokens_per_s: dict[Key, float]  # measured over the last period, per logical expert
    replicas: dict[Key, int]  # ready replicas now, per logical expert (the set of experts that exist)
    host_replicas: dict[str, int]  # replicas each live host holds now (0 = empty)


@dataclass
class PolicyState:
    """The policy's memory between calls; plain data for the Controller to persist."""

    smoothed: dict[Key, float] = field(default_factory=dict)  # tokens/s, moving average
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


def _smooth(sample: float, old: float | None, smoothing: float) -> float:
    """Exponential moving average; the first sample starts it. A rate that is negative or not
    finite is a reporting bug, not load: it counts as 0 so it cannot poison the average."""
    x = sample if math.isfinite(sample) and sample > 0 else 0.0
    return x if old is None else smoothing * x + (1 - smoothing) * old


def _step(
    current: int, desired: int, pending: tuple[int, float] | None, now: float, cfg: AutoscalingConfig
) -> tuple[int, tuple[int, float] | None]:
    """-> (replicas to have now, pending). A count outside [min, max] is clamped at once; moving
    towards `desired` waits until the wish has pointed the same way for the direction's delay."""
    base = min(max(current, cfg.min_replicas), cfg.max_replicas)
    if desired == base:
        return base, None
    up = desired > base
    same_way = pending is not None and (pending[0] > base) == up and pending[0] != base
    since = pending[1] if same_way else now
    delay_s = cfg.upscale_delay_s if up else cfg.downscale_delay_s
    if now - since >= delay_s:
        return desired, None
    return base, (desired, since)


# ---------------------------------------------------------------------------------------------
# per host


def _empty_since(host_replicas: dict[str, int], old: dict[str, float], now: float) -> dict[str, float]:
    """Hosts holding no replica -> since when; hosts that hold replicas or are gone drop out."""
    return {h: old.get(h, now) for h, n in host_replicas.items() if n == 0}


# ---------------------------------------------------------------------------------------------
# policy


def decide(snapshot: Snapshot, state: PolicyState, now: float) -> tuple[Decision, PolicyState]:
    """One period: snapshot + state + clock -> (what to change now, the next state).

    Experts missing from `snapshot.tokens_per_s` had no load (0 tokens/s). Experts missing from
    `snapshot.replicas` no longer exist and drop out of the state; new ones start fresh.
    `state` is not modified.
    """
    cfg = snapshot.config
    smoothed: dict[Key, float] = {}
    pending: dict[Key, tuple[int, float]] = {}
    changes: dict[Key, int] = {}
    for key, current in snapshot.replicas.items():
        smoothed[key] = _smooth(snapshot.tokens_per_s.get(key, 0.0), state.smoothed.get(key), cfg.smoothing)
        target, wish = _step(current, desired_replicas(smoothed[key], cfg), state.pending.get(key), now, cfg)
        if target != current:
            changes[key] = target
        if wish is not None:
            pending[key] = wish

    empty_since = _empty_since(snapshot.host_replicas, state.host_empty_since, now)
    retire = sorted(h for h, t in empty_since.items() if now - t >= cfg.host_idle_s)
    return Decision(changes, retire), PolicyState(smoothed, pending, empty_since)


# ---------------------------------------------------------------------------------------------
# around the policy: what the Controller (and the simulator, moefleet.sim) do with each period

LOAD_SMOOTHING = 0.5  # weight of the newest period's rate in the load that placement plans for


def smooth_load(rate, old):
    """The load placement plans for: an exponential moving average of the measured rates; the
    first one starts it. Works on floats and on numpy arrays alike."""
    return rate if old is None else LOAD_SMOOTHING * rate + (1 - LOAD_SMOOTHING) * old


def retirable(retire_hosts: list[str], host_replicas: dict[str, int], min_hosts: int) -> list[str]:
    """Of the hosts `decide` says to retire, those to end now: still empty, in order, while more
    than `min_hosts` (the spec's hosts.count) of `host_replicas`' hosts remain."""
    left, out = len(host_replicas), []
    for h in retire_hosts:
        if left > min_hosts and host_replicas.get(h) == 0:
            out.append(h)
            left -= 1
    return out
