"""cluster/autoscale.py: replicas follow sustained load after the configured delays, stay inside
[min, max], ignore a damped spike, and idle hosts are retired; driven by a fake clock, no cluster.
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest

from moefleet.cluster.autoscale import (
    AutoscalingConfig,
    Decision,
    PolicyState,
    Snapshot,
    decide,
    desired_replicas,
    retirable,
    smooth,
)

pytestmark = pytest.mark.unit

K = (0, 0)  # the one expert most tests watch


def _cfg(**over) -> AutoscalingConfig:
    """target 100 tokens/s per replica, 1..8 replicas, no smoothing unless asked."""
    base = dict(enabled=True, target_tokens_per_s=100.0, min_replicas=1, max_replicas=8,
                upscale_delay_s=2.0, downscale_delay_s=4.0, smoothing=1.0, period_s=1.0, host_idle_s=10.0)
    return AutoscalingConfig(**{**base, **over})


def _snap(cfg: AutoscalingConfig, tokens: dict, replicas: dict, hosts: dict | None = None) -> Snapshot:
    return Snapshot(cfg, tokens, replicas, hosts or {})


def _smoothed(cfg: AutoscalingConfig, loads: list[float]) -> list[float]:
    """`smooth` over measured `loads`, one per period, as the Controller's poll runs it."""
    out, last = [], None
    for load in loads:
        last = smooth(cfg.smoothing, np.array([load]), last)
        out.append(float(last[0]))
    return out


def _simulate(cfg: AutoscalingConfig, loads: list[float], replicas: int = 1) -> list[int]:
    """Expert K under measured `loads` (tokens/s), one period at t = 0, 1, 2, ...: smoothed, then
    decided, as the Controller does; each decision is carried out at once. -> replica count
    after each decide."""
    state, counts = PolicyState(), []
    for t, load in enumerate(_smoothed(cfg, loads)):
        decision, state = decide(_snap(cfg, {K: load}, {K: replicas}), state, float(t))
        replicas = decision.replicas.get(K, replicas)
        counts.append(replicas)
    return counts


# ---------------------------------------------------------------------------------------------
# desired_replicas


@pytest.mark.parametrize("tokens_per_s, want", [
    (0.0, 1), (1.0, 1), (100.0, 1), (100.1, 2), (250.0, 3), (800.0, 8), (10_000.0, 8),
    (-5.0, 1), (math.nan, 1), (math.inf, 8),
])
def test_desired_replicas_is_ceil_of_load_over_target_within_bounds(tokens_per_s: float, want: int) -> None:
    assert desired_replicas(tokens_per_s, _cfg()) == want


def test_zero_load_wants_min_replicas() -> None:
    assert desired_replicas(0.0, _cfg(min_replicas=3)) == 3


# ---------------------------------------------------------------------------------------------
# delays


def test_upscale_only_after_upscale_delay_of_sustained_load() -> None:
    # 250 tokens/s wants 3; delay 2 s: t=0 first seen, t=1 one step before, t=2 acts
    assert _simulate(_cfg(), [250.0] * 4) == [1, 1, 3, 3]


def test_upscale_keeps_its_start_time_when_the_wanted_count_grows() -> None:
    assert _simulate(_cfg(), [250.0, 450.0, 450.0]) == [1, 1, 5]


def test_upscale_pending_is_recorded_with_first_seen_time() -> None:
    _, state = decide(_snap(_cfg(), {K: 250.0}, {K: 1}), PolicyState(), 7.0)
    assert state.pending == {K: (3, 7.0)}


def test_downscale_after_downscale_delay() -> None:
    assert _simulate(_cfg(), [50.0] * 6, replicas=3) == [3, 3, 3, 3, 1, 1]


def test_load_blip_during_downscale_wait_resets_it() -> None:
    loads = [50.0, 50.0, 50.0, 300.0] + [50.0] * 5  # 300 wants the current 3: pending cleared at t=3
    assert _simulate(_cfg(), loads, replicas=3) == [3, 3, 3, 3, 3, 3, 3, 3, 1]


def test_direction_flip_restarts_the_wait() -> None:
    # wants down at t=0,1, then up from t=2: the upscale waits its own 2 s from t=2
    loads = [50.0, 50.0, 450.0, 450.0, 450.0]
    assert _simulate(_cfg(), loads, replicas=3) == [3, 3, 3, 3, 5]


def test_zero_delays_act_on_the_first_decide() -> None:
    cfg = _cfg(upscale_delay_s=0.0, downscale_delay_s=0.0)
    assert _simulate(cfg, [450.0]) == [5]
    assert _simulate(cfg, [50.0], replicas=5) == [1]


def test_acting_clears_pending() -> None:
    cfg = _cfg(upscale_delay_s=0.0)
    decision, state = decide(_snap(cfg, {K: 250.0}, {K: 1}), PolicyState(), 0.0)
    assert decision.replicas == {K: 3}
    assert state.pending == {}


# ---------------------------------------------------------------------------------------------
# bounds


def test_load_beyond_max_stops_at_max() -> None:
    assert _simulate(_cfg(max_replicas=4, upscale_delay_s=0.0), [10_000.0]) == [4]


def test_cold_expert_never_goes_below_min() -> None:
    assert _simulate(_cfg(min_replicas=2, downscale_delay_s=0.0), [0.0, 0.0], replicas=2) == [2, 2]


def test_expert_below_min_is_raised_at_once_despite_delays() -> None:
    cfg = _cfg(min_replicas=2, upscale_delay_s=100.0)
    decision, _ = decide(_snap(cfg, {}, {K: 0}), PolicyState(), 0.0)
    assert decision.replicas == {K: 2}


def test_expert_above_max_is_lowered_at_once_then_downscales_after_the_delay() -> None:
    # 6 replicas with max 4 and no load: clamp to 4 now, reach min 1 after downscale_delay_s
    assert _simulate(_cfg(max_replicas=4), [0.0] * 5, replicas=6) == [4, 4, 4, 4, 1]


def test_clamp_to_min_keeps_the_upscale_wait_running() -> None:
    # no replicas and high load: 1 at once, then the rest when the 2 s since t=0 have passed
    assert _simulate(_cfg(), [250.0] * 3, replicas=0) == [1, 1, 3]


# ---------------------------------------------------------------------------------------------
# smoothing


def test_smoothing_damps_a_single_spike_below_the_upscale_point() -> None:
    cfg = _cfg(smoothing=0.5, upscale_delay_s=0.0)
    assert _smoothed(cfg, [60.0, 130.0, 60.0]) == [60.0, 95.0, 77.5]  # 0.5*130 + 0.5*60, ...: never > 100
    assert _simulate(cfg, [60.0, 130.0, 60.0]) == [1, 1, 1]


def test_without_smoothing_the_same_spike_upscales() -> None:
    assert _simulate(_cfg(smoothing=1.0, upscale_delay_s=0.0), [60.0, 130.0]) == [1, 2]


def test_smoothed_load_keeps_a_spike_alive_into_the_delay() -> None:
    # 100, 500, 100, 100 -> smoothed 100, 300, 200, 150: wants 3, 2, 2 since t=1, so it acts at t=3
    assert _simulate(_cfg(smoothing=0.5), [100.0, 500.0, 100.0, 100.0]) == [1, 1, 1, 2]


def test_expert_without_a_rate_counts_as_zero_load() -> None:
    cfg = _cfg(min_replicas=2, downscale_delay_s=0.0)
    decision, _ = decide(_snap(cfg, {}, {K: 5}), PolicyState(), 0.0)
    assert decision.replicas == {K: 2}


def test_smooth_starts_at_the_first_rate_then_averages_by_the_weight() -> None:
    assert smooth(0.5, np.array([10.0]), None).tolist() == [10.0]
    assert smooth(0.5, np.array([10.0]), np.array([30.0])).tolist() == [20.0]
    assert smooth(0.25, np.array([10.0]), np.array([30.0])).tolist() == [25.0]
    assert smooth(1.0, np.array([10.0]), np.array([30.0])).tolist() == [10.0]  # 1: no smoothing


def test_smooth_counts_a_non_finite_or_negative_rate_as_zero_and_starts_new_experts_fresh() -> None:
    rates = np.array([math.nan, -50.0, math.inf, 40.0, -0.0])
    old = np.array([200.0, 200.0, 200.0, math.nan, math.nan])
    got = smooth(0.5, rates, old)
    assert got.tolist() == [100.0, 100.0, 100.0, 40.0, 0.0]  # a new expert's first rate, unsmoothed
    assert not np.signbit(got).any()
    assert not np.signbit(smooth(0.5, np.array([-0.0]), None)).any()


# ---------------------------------------------------------------------------------------------
# experts come and go, skew


def test_removed_expert_is_dropped_from_state_and_added_one_starts_fresh() -> None:
    old, new = (0, 1), (0, 2)
    state = PolicyState(pending={old: (5, 0.0), K: (2, 0.0)})
    decision, state = decide(_snap(_cfg(), {K: 100.0, new: 250.0}, {K: 1, new: 1}), state, 1.0)
    assert decision.replicas == {}
    assert state.pending == {new: (3, 1.0)}


def test_skewed_load_scales_the_hot_expert_and_leaves_cold_ones_at_min() -> None:
    cfg = _cfg(upscale_delay_s=0.0, downscale_delay_s=0.0)
    experts = [(1, e) for e in range(8)]
    tokens = {key: 20.0 for key in experts} | {(1, 3): 650.0}
    decision, state = decide(_snap(cfg, tokens, dict.fromkeys(experts, 1)), PolicyState(), 0.0)
    assert decision.replicas == {(1, 3): 7}
    assert state.pending == {}


# ---------------------------------------------------------------------------------------------
# hosts


def _retired(cfg: AutoscalingConfig, timeline: list[tuple[float, dict[str, int]]]) -> list[list[str]]:
    state, out = PolicyState(), []
    for now, hosts in timeline:
        decision, state = decide(_snap(cfg, {}, {}, hosts), state, now)
        out.append(decision.retire_hosts)
    return out


def test_empty_host_is_retired_after_host_idle_s_not_before() -> None:
    timeline = [(0.0, {"a": 2, "b": 0}), (9.5, {"a": 2, "b": 0}), (10.0, {"a": 2, "b": 0})]
    assert _retired(_cfg(), timeline) == [[], [], ["b"]]


def test_host_that_receives_a_replica_again_is_not_retired() -> None:
    timeline = [(0.0, {"b": 0}), (5.0, {"b": 1}), (10.0, {"b": 0}), (19.0, {"b": 0}), (20.0, {"b": 0})]
    assert _retired(_cfg(), timeline) == [[], [], [], [], ["b"]]


def test_retired_hosts_are_sorted_and_vanished_hosts_dropped() -> None:
    cfg = _cfg(host_idle_s=0.0)
    decision, state = decide(_snap(cfg, {}, {}, {"c": 0, "a": 0, "b": 3}), PolicyState(), 0.0)
    assert decision.retire_hosts == ["a", "c"]
    _, state = decide(_snap(cfg, {}, {}, {"b": 0}), state, 1.0)
    assert state.host_empty_since == {"b": 1.0}


# ---------------------------------------------------------------------------------------------
# config and purity


@pytest.mark.parametrize("over, field", [
    ({"target_tokens_per_s": 0.0}, "target_tokens_per_s"),
    ({"min_replicas": 0}, "min_replicas"),
    ({"min_replicas": 5, "max_replicas": 4}, "max_replicas"),
    ({"upscale_delay_s": -1.0}, "upscale_delay_s"),
    ({"downscale_delay_s": -1.0}, "downscale_delay_s"),
    ({"host_idle_s": -1.0}, "host_idle_s"),
    ({"smoothing": 0.0}, "smoothing"),
    ({"smoothing": 1.5}, "smoothing"),
    ({"smoothing": math.nan}, "smoothing"),
    ({"period_s": 0.0}, "period_s"),
])
def test_bad_config_raises_value_error_naming_the_field(over: dict, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"autoscaling.{field} must be")):
        AutoscalingConfig(**over)


def test_default_config_is_valid_and_disabled() -> None:
    cfg = AutoscalingConfig()
    assert (cfg.enabled, cfg.min_replicas, cfg.max_replicas, cfg.smoothing) == (False, 1, 4, 0.5)


def test_decide_does_not_mutate_the_state_passed_in() -> None:
    cfg = _cfg(smoothing=0.5, upscale_delay_s=0.0)
    gone = (9, 9)
    state = PolicyState(pending={K: (2, 0.0), gone: (3, 0.0)}, host_empty_since={"a": 0.0, "gone": 0.0})
    before = copy.deepcopy(state)
    decision, after = decide(_snap(cfg, {K: 500.0}, {K: 1}, {"a": 1, "b": 0}), state, 5.0)
    assert state == before
    assert after is not state and after.pending is not state.pending
    assert decision == Decision({K: 5}, [])
    assert after == PolicyState(pending={}, host_empty_since={"b": 5.0})


def test_retirable_keeps_the_spec_hosts_and_only_ends_empty_ones():
    held = {"a": 0, "b": 0, "c": 2, "d": 0}
    assert retirable(["a", "b", "d"], held, min_hosts=2) == ["a", "b"]  # 4 hosts, keep 2
    assert retirable(["c", "d"], held, min_hosts=1) == ["d"]  # c holds replicas again
    assert retirable(["a"], held, min_hosts=4) == []


def test_decide_on_dicts_and_expert_targets_on_arrays_agree():
    """The Controller calls `decide`; the simulator calls its array core directly."""
    from moefleet.cluster.autoscale import ExpertState, expert_targets

    cfg = _cfg(smoothing=0.5)
    keys = [(0, e) for e in range(6)]
    state, arrays, counts, smoothed = PolicyState(), ExpertState.empty(6), [1] * 6, None
    changed = []
    for t, scale in enumerate([50, 400, 400, 400, 900, 0, 0, 0, 0, 0]):
        smoothed = smooth(cfg.smoothing, np.array([scale * (e + 1) / 6 for e in range(6)]), smoothed)
        rates = smoothed.tolist()
        snap = _snap(cfg, dict(zip(keys, rates, strict=True)), dict(zip(keys, counts, strict=True)))
        decision, state = decide(snap, state, float(t))
        target, arrays = expert_targets(cfg, np.array(rates), np.array(counts), arrays, float(t))
        target = target.tolist()
        assert {k: n for k, n, c in zip(keys, target, counts, strict=True) if n != c} == decision.replicas
        changed.append(decision.replicas)
        counts = target
    # smoothed at t=3: [59, 119, 178, 238, 297, 356] tokens/s; wishes since t=1 fire after 2 s
    assert changed[3] == {(0, 2): 2, (0, 3): 3, (0, 4): 3, (0, 5): 4}
    assert changed[4] == {(0, 1): 3}  # its wish dates from t=2; the others start a new wait


def _plain_smooth(weight, tokens_per_s, old):
    """`smooth` written out, each step a full-array operation: the reference it must equal."""
    x = np.where(np.isfinite(tokens_per_s) & (tokens_per_s > 0), tokens_per_s, 0.0)
    if old is None:
        return x
    return np.where(np.isnan(old), x, weight * x + (1 - weight) * old)


def _plain_expert_targets(cfg, tokens_per_s, current, state, now):
    """`expert_targets` written out over every expert, each step a full-array operation: the
    reference its faster form (only the experts whose wish differs from their count do more than
    wish) must equal bit for bit."""
    from moefleet.cluster.autoscale import ExpertState

    r = tokens_per_s
    desired = np.where(r > 0, np.maximum(cfg.min_replicas, np.ceil(
        np.minimum(r / cfg.target_tokens_per_s, cfg.max_replicas))), cfg.min_replicas).astype(np.int64)
    base = np.clip(np.asarray(current, dtype=np.int64), cfg.min_replicas, cfg.max_replicas)
    up = desired > base
    pn = state.pending_n
    same_way = (pn > 0) & ((pn > base) == up) & (pn != base)
    since = np.where(same_way, state.pending_since, now)
    fire = now - since >= np.where(up, cfg.upscale_delay_s, cfg.downscale_delay_s)
    moving = desired != base
    target = np.where(moving & fire, desired, base)
    wait = moving & ~fire
    return target, ExpertState(np.where(wait, desired, 0), np.where(wait, since, 0.0))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf · 0, both forms
@pytest.mark.parametrize("seed", range(6))
def test_smooth_and_expert_targets_equal_their_plain_full_array_forms_bit_for_bit(seed: int) -> None:
    """Over a random walk of rates (NaN, inf, negative and zero among them), counts (some outside
    [min, max], some carried out, some not) and delays, both give the same smoothed rates, targets
    and state, to the bit, and leave their inputs alone."""
    from moefleet.cluster.autoscale import ExpertState, expert_targets

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    cfg = _cfg(smoothing=float(rng.choice([1.0, 0.5, 0.3])), upscale_delay_s=float(rng.integers(0, 4)),
               downscale_delay_s=float(rng.integers(0, 6)), min_replicas=int(rng.integers(1, 3)),
               max_replicas=int(rng.integers(3, 9)))
    state, counts, smoothed = ExpertState.empty(n), rng.integers(0, 11, n), np.full(n, np.nan)  # none yet
    for t in range(60):
        rates = rng.lognormal(4.5, 1.5, n) * rng.choice([0.0, 1.0, 1.0, 3.0])
        odd = rng.random(n) < 0.05
        rates[odd] = rng.choice([np.nan, np.inf, -np.inf, -5.0, 0.0, -0.0], odd.sum())
        if t == 30:  # a load restored with some experts never sampled, some overflowed
            smoothed[rng.random(n) < 0.3] = np.nan
            smoothed[rng.random(n) < 0.05] = np.inf
        inputs = [rates, counts, state.pending_n, state.pending_since, smoothed]
        before = [a.copy() for a in inputs]
        want_smoothed = _plain_smooth(cfg.smoothing, rates, smoothed)
        got_smoothed = smooth(cfg.smoothing, rates, smoothed)
        want, want_state = _plain_expert_targets(cfg, want_smoothed, counts, state, float(t))
        got, got_state = expert_targets(cfg, got_smoothed, counts, state, float(t))
        for a, b in zip((got_smoothed, got, got_state.pending_n, got_state.pending_since),
                        (want_smoothed, want, want_state.pending_n, want_state.pending_since),
                        strict=True):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
        for a, b in zip(before, inputs, strict=True):
            assert np.array_equal(a, b, equal_nan=True)
        state, smoothed = got_state, got_smoothed
        keep = rng.random(n) < 0.7  # the planner carries out most targets
        counts = np.where(keep, got, counts)
        if t % 17 == 0:
            counts = rng.integers(0, 11, n)
