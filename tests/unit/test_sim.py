"""moefleet.sim: the cost model (and its micro-batcher) against hand-computed cases, the load
generator's Gini against its target, trace replay against a hand-made trace, the policies'
invariants (consolidation's too), scenario errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moefleet.cli.main import main
from moefleet.sim import (
    Fleet,
    Generated,
    Scenario,
    SpecError,
    expert_rows_per_s,
    gini,
    layout,
    load_s,
    load_scenario,
    merged_tokens,
    period_cost,
    popularity_profile,
    read_trace,
    simulate,
)

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "sim"

# one layer, H = I = 1000, FP8: 3 MB of weights (3 ms at 1 GB/s), 6 MFLOP per row (6 µs at 1 TFLOP/s)
_HAND = {"name": "hand", "model": {"layers": 1, "n_routed_experts": 2, "num_experts_per_tok": 1,
                                   "hidden_size": 1000, "moe_intermediate_size": 1000, "bytes_per_param": 1},
         "hosts": {"count": 2, "slots": 2},
         "cost": {"tflops": 1, "hbm_gbps": 1, "call_overhead_s": 1e-3, "net_latency_s": 5e-4,
                  "net_gbps": 1, "activation_bytes": 4, "load_gbps": 1, "batch_tokens": 100,
                  "max_wait_ms": 0}}


def _cost(placement, rate, **cost):
    sc = Scenario.from_dict({**_HAND, "cost": {**_HAND["cost"], **cost}})
    return period_cost(sc.cost, sc.model, layout(placement, ["a", "b"], sc.model), np.array(rate, float))


# ---- cost model ---------------------------------------------------------------------------

def test_weight_bound_call_matches_the_hand_computed_md1_latency():
    # 10000 rows/s in calls of 100 tokens: 100 calls/s, 100 rows per call on host a.
    # busy per call = 1 ms overhead + 3 ms weights (> 0.6 ms of FLOPs) + 0.8 ms wire = 4.8 ms
    # rho = 100 × 4.8 ms = 0.48; M/D/1 wait = 0.48 × 4.8 ms / (2 × 0.52)
    c = _cost({(0, 0): ["a"], (0, 1): ["b"]}, [10000.0, 0.0])
    assert c.utilisation.tolist() == pytest.approx([0.48, 0.0])
    assert c.latency_s[0] == pytest.approx(0.5e-3 + 4.8e-3 + 0.48 * 4.8e-3 / 1.04)
    assert c.host_rows.tolist() == [10000.0, 0.0]


def test_compute_bound_call_costs_its_flops():
    # calls of 1000 tokens: 1 call/s of 1000 rows: 6 ms of FLOPs beat 3 ms of weights
    # busy = 1 ms + 6 ms + 8 ms wire = 15 ms, rho = 0.015
    c = _cost({(0, 0): ["a"], (0, 1): ["b"]}, [1000.0, 0.0], batch_tokens=1000)
    assert c.utilisation[0] == pytest.approx(0.015)
    assert c.latency_s[0] == pytest.approx(0.5e-3 + 15e-3 + 0.015 * 15e-3 / (2 * 0.985))


def test_a_second_replica_halves_each_hosts_rows_and_a_saturated_host_is_infinite():
    two = _cost({(0, 0): ["a", "b"], (0, 1): ["b"]}, [10000.0, 0.0])
    assert two.host_rows.tolist() == [5000.0, 5000.0]
    busy = 1e-3 + 3e-3 + 0.4e-3  # 50 rows per call each
    assert two.utilisation[0] == pytest.approx(100 * busy)
    assert math.isinf(_cost({(0, 0): ["a"], (0, 1): ["b"]}, [30000.0, 0.0]).latency_s[0])  # rho 1.44


def test_the_micro_batcher_merges_requests_that_find_a_call_in_flight():
    def merged(tokens_per_s, latency_s, **cost):
        sc = Scenario.from_dict({**_HAND, "cost": {**_HAND["cost"], "batch_tokens": 16, **cost}})
        return merged_tokens(sc.cost, np.array([tokens_per_s]), np.array([latency_s]))[0]

    # 100 requests/s of 16 tokens; a saturated layer always has a call in flight, so each call
    # carries 1 + 100/s × 10 ms = 2 requests; max_wait_ms 0 (or no load) never merges
    assert merged(1600.0, math.inf, max_wait_ms=10) == pytest.approx(32)
    assert merged(1600.0, math.inf, max_wait_ms=0) == 16 and merged(0.0, 0.01, max_wait_ms=10) == 16
    assert merged(1600.0, math.inf, max_wait_ms=100) == pytest.approx(16 * 11)
    assert merged(1600.0, math.inf, max_wait_ms=100, max_batch_tokens=64) == pytest.approx(64)
    # 5 ms calls: in flight part of the time; c = λ (e^(-cS) + (1 - e^(-cS)) / n) holds
    b = merged(1600.0, 0.005, max_wait_ms=10)
    c, lam, n = 1600.0 / b, 100.0, 1 + 100 * 0.005
    assert 16 < b < 24 and c == pytest.approx(lam * (math.exp(-c * 0.005) + (1 - math.exp(-c * 0.005)) / n))


@pytest.mark.parametrize("seed", range(8))
def test_evaluate_equals_the_plain_masked_form_saturated_or_not(seed):
    """`evaluate` skips the mask when no host is saturated (every wait finite): the same latency,
    rows and utilisation, to the bit, as the plain form that masks the hosts a layer never calls
    and sets a saturated host's wait to inf."""
    from moefleet.sim.cost import evaluate, profile, rows_per_call

    rng = np.random.default_rng(seed)
    sc = Scenario.from_dict({**_HAND, "model": {**_HAND["model"], "layers": 3, "n_routed_experts": 6},
                             "hosts": {"count": 4, "slots": 12}})
    hosts, E = ["a", "b", "c", "d"], 6
    placement = {(L, e): list(rng.choice(hosts, rng.integers(1, 3), replace=False))
                 for L in range(3) for e in range(E) if rng.random() < 0.9}
    lay = layout(placement, hosts, sc.model)
    for scale in (1.0, 30.0, 3000.0):  # idle hosts, busy ones, saturated ones
        rate = rng.lognormal(3, 1, 18) * scale * (rng.random(18) < 0.7)
        x, calls = rows_per_call(sc.cost, sc.model, rate)
        prof = profile(sc.cost, sc.model, lay, x)
        got = evaluate(sc.cost, prof, calls)
        rho = prof.busy @ calls
        host_calls = prof.hit @ calls
        mean_s = np.divide(rho, host_calls, out=np.zeros_like(rho), where=host_calls > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            wait = np.where(rho < 1, rho * mean_s / (2 * (1 - rho)), np.inf)
        s = np.where(prof.called, prof.per_hit + wait[:, None], 0.0)
        want = (sc.cost.net_latency_s + s.max(axis=0, initial=0.0), prof.rows @ calls, rho)
        for a, b in zip((got.latency_s, got.host_rows, got.utilisation), want, strict=True):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("seed", range(6))
def test_evaluate_on_many_periods_gives_each_the_bits_it_gets_alone(seed):
    """The simulator costs the periods one profile serves in one call: each row of [n, L]
    calls (idle, busy and saturated rows mixed, so one call takes the masked form for all)
    gives the latency, rows and utilisation it gives alone, to the bit."""
    from moefleet.sim.cost import evaluate, profile, rows_per_call

    rng = np.random.default_rng(seed)
    sc = Scenario.from_dict({**_HAND, "model": {**_HAND["model"], "layers": 3, "n_routed_experts": 6},
                             "hosts": {"count": 4, "slots": 12}})
    hosts = ["a", "b", "c", "d"]
    placement = {(L, e): list(rng.choice(hosts, rng.integers(1, 3), replace=False))
                 for L in range(3) for e in range(6) if rng.random() < 0.9}
    lay = layout(placement, hosts, sc.model)
    pattern = rng.lognormal(3, 1, 18) * (rng.random(18) < 0.7)
    x, _ = rows_per_call(sc.cost, sc.model, pattern)
    prof = profile(sc.cost, sc.model, lay, x)
    calls = np.stack([rows_per_call(sc.cost, sc.model, pattern * s)[1]
                      for s in rng.choice([0.0, 1.0, 30.0, 3000.0], 12)])  # [12, L]
    for rows in (calls, calls[calls.sum(axis=1) < 1e9][:4]):  # and a batch of whatever it holds
        got = evaluate(sc.cost, prof, rows)
        for i, c in enumerate(rows):
            alone = evaluate(sc.cost, prof, c)
            for a, b in zip((got.latency_s[i], got.host_rows[i], got.utilisation[i]),
                            (alone.latency_s, alone.host_rows, alone.utilisation), strict=True):
                assert a.tobytes() == b.tobytes()


def _plain_profile(cfg, m, lay, x):
    """`profile` as first written, each step one expression: the reference its faster form (the
    layer of a replica by a shift when E is a power of two, the per-expert time in two buffers)
    must equal bit for bit."""
    L, E, H = m.layers, m.n_routed_experts, len(lay.hosts)
    n = np.divide(x, lay.count, out=np.zeros_like(x), where=lay.count > 0)
    t = np.maximum(n * m.flops_per_row / (cfg.tflops * 1e12),
                   -np.expm1(-n) * m.expert_bytes / (cfg.hbm_gbps * 1e9))
    idx = lay.host * L + lay.key // E
    work = np.bincount(idx, weights=t[lay.key], minlength=H * L).reshape(H, L)
    rows = np.bincount(idx, weights=n[lay.key], minlength=H * L).reshape(H, L)
    hit = -np.expm1(-rows)
    wire = 2 * rows * m.hidden_size * cfg.activation_bytes / (cfg.net_gbps * 1e9)
    busy = hit * cfg.call_overhead_s + work + wire
    called = hit > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = busy / hit
    return busy, hit, rows, called, np.where(called, q, 0.0), np.where(called, q, -np.inf)


@pytest.mark.parametrize("seed", range(8))
def test_profile_equals_its_plain_form_bit_for_bit(seed):
    """Random placements over 1-4 layers of 4, 6, 8 or 256 experts (shift or division), every
    expert placed or some not, idle and busy rates: the same six [H, L] tables to the bit."""
    from moefleet.sim.cost import profile, rows_per_call

    rng = np.random.default_rng(seed)
    layers, E = int(rng.integers(1, 5)), int(rng.choice([4, 6, 8, 256]))
    sc = Scenario.from_dict({**_HAND, "model": {**_HAND["model"], "layers": layers, "n_routed_experts": E},
                             "hosts": {"count": 4, "slots": 4 * E}})
    hosts = ["a", "b", "c", "d"]
    every = seed % 2 == 0
    placement = {(L, e): list(rng.choice(hosts, rng.integers(1, 4), replace=False))
                 for L in range(layers) for e in range(E) if every or rng.random() < 0.8}
    lay = layout(placement, hosts, sc.model)
    for scale in (0.0, 1.0, 300.0):
        rate = rng.lognormal(3, 1, layers * E) * scale * (rng.random(layers * E) < 0.8)
        x, _ = rows_per_call(sc.cost, sc.model, rate)
        got = profile(sc.cost, sc.model, lay, x)
        want = _plain_profile(sc.cost, sc.model, lay, x)
        for a, b in zip((got.busy, got.hit, got.rows, got.called, got.per_hit, got.part), want, strict=True):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("seed", range(10))
def test_same_rows_equals_comparing_every_row(seed):
    """The simulator compares only the first row of each run of generated rows that differ by
    their scale (the others are within _SAME by a rounding bound): over consecutive chunks of
    random generated loads (lognormal or Zipf, drift, shifts, bursts, a trough at 0, Poisson or
    not) the same flags as `_same_as_before` over every row, and `rows_given_calls` row by row
    gives `rows_per_call`'s x to the bit."""
    import sys

    from moefleet.sim.cost import layer_calls, rows_given_calls, rows_per_call

    run = sys.modules["moefleet.sim.run"]
    rng = np.random.default_rng(seed)
    model = {"layers": int(rng.integers(1, 5)), "n_routed_experts": int(rng.choice([4, 16, 64, 256])),
             "num_experts_per_tok": int(rng.integers(1, 5)), "hidden_size": 64, "moe_intermediate_size": 64}
    load = {"tokens_per_s": float(rng.choice([1e-3, 1.0, 3e4, 1e9])),
            "trough_ratio": float(rng.choice([0.0, 0.3])),
            "popularity": str(rng.choice(["lognormal", "zipf"])),
            "drift_hours": float(rng.choice([0.0, 0.05, 6.0])),
            "shifts_per_hour": float(rng.choice([0.0, 20.0])),
            "bursts_per_hour": float(rng.choice([0.0, 30.0])), "burst_s": 20.0,
            "poisson": bool(seed % 4 == 3), "peak_hour": float(rng.uniform(0, 24)), "seed": seed}
    sc = Scenario.from_dict({"name": "same", "duration_s": 4000, "model": model,
                             "hosts": {"count": 4, "slots": 256}, "load": load})
    src, last, step = Generated(sc), None, int(rng.choice([16, 64, 256]))
    for start in range(0, 1500, step):
        rates = src.chunk(start, step)
        calls = layer_calls(sc.cost, sc.model, rates)
        x = run._Rows(sc.model, rates, calls)
        got = run._same_rows(sc, src, start, x, last)
        full, want_calls = rows_per_call(sc.cost, sc.model, rates)
        assert calls.tobytes() == want_calls.tobytes()
        want = run._same_as_before(full, full[:1] if last is None else last[-1][None])
        assert got.tolist() == want.tolist()
        for i in rng.choice(step, 3):
            one = rows_given_calls(sc.model, rates[i], calls[i])
            assert x[int(i)].tobytes() == full[i].tobytes() == one.tobytes()
        last = x


def test_load_time_and_roofline_throughput():
    sc = Scenario.from_dict(_HAND)
    assert load_s(sc.cost, sc.model) == pytest.approx(3e-3)
    # 100 rows per call: max(0.6 ms, 3 ms) + 1 ms overhead per 100 rows
    assert expert_rows_per_s(sc.cost, sc.model, 100) == pytest.approx(100 / 4e-3)


# ---- load ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lognormal", "zipf"])
def test_popularity_profile_hits_each_layers_target_gini(kind):
    target = np.array([0.1, 0.25, 0.4])
    p = popularity_profile(kind, 256, target, np.random.default_rng(0))
    assert np.allclose(p.sum(axis=1), 1)
    assert np.allclose(gini(p), target, atol=1e-6)


def test_generated_rows_keep_the_target_gini_and_the_diurnal_rate():
    sc = Scenario.from_dict({"name": "g", "duration_s": 60, "model": {"layers": 3, "n_routed_experts": 64},
                             "hosts": {"count": 4, "slots": 64},
                             "load": {"tokens_per_s": 1e6, "peak_hour": 0, "trough_ratio": 0.5}})
    gen = Generated(sc)
    rows = gen.chunk(0, 1)[0].reshape(3, 64)  # Poisson samples of ~31k rows/s per expert
    assert np.allclose(gini(rows), gen.target, atol=0.005)
    assert rows.sum() == pytest.approx(3 * 2e6, rel=1e-3)  # peak at t=0: 1e6 tokens × top-2 × 3 layers
    assert gen.tokens_per_s(np.array([12 * 3600.0]))[0] == pytest.approx(0.5e6)  # trough at noon


# ---- trace replay -------------------------------------------------------------------------

def test_replayed_rows_are_binned_per_period(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("t,layer,expert,tokens\n0.1,0,1,5\n0.9,0,1,3\n1.5,1,0,4\n9.0,0,0,100\n")
    r = read_trace(str(rows), layers=2, n_experts=2, period_s=1.0, periods=2)
    assert r.tolist() == [[0, 8, 0, 0], [0, 0, 4, 0]]  # t=9 is past the 2 periods: dropped
    picks = tmp_path / "picks.csv"
    picks.write_text("t,layer,experts\n0.0,0,0 1\n0.5,0,1 0\n1.2,1,1 0\n")
    assert read_trace(str(picks), 2, 2, 0.5, 3).tolist() == [[2, 2, 0, 0], [2, 2, 0, 0], [0, 0, 2, 2]]


def test_a_parquet_trace_replays_like_its_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = {"t": [0.0, 0.5, 1.2], "layer": [0, 0, 1], "experts": [[0, 1], [1, 0], [1, 0]]}
    pq.write_table(pa.table(table), tmp_path / "picks.parquet")
    assert read_trace(str(tmp_path / "picks.parquet"), 2, 2, 0.5, 3).tolist() == \
        [[2, 2, 0, 0], [2, 2, 0, 0], [0, 0, 2, 2]]


def test_a_trace_row_out_of_range_is_named(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("t,layer,expert,tokens\n0,0,1,5\n0,0,7,1\n")
    with pytest.raises(SpecError, match=r"expert 7 is out of range \[0, 2\) \(row 2\)"):
        read_trace(str(f), 1, 2, 1.0, 1)
    with pytest.raises(SpecError, match="load.trace: no such file"):
        read_trace(str(tmp_path / "missing.csv"), 1, 2, 1.0, 1)


def test_the_shipped_sample_trace_replays():
    sc = load_scenario(EXAMPLES / "trace.yaml")
    series = simulate(sc)
    assert set(series) == {p.name for p in sc.policies}
    assert all(len(s.p99_s) == sc.periods for s in series.values())


# ---- policies -----------------------------------------------------------------------------

_POLICY = {"name": "inv", "duration_s": 240, "model": {"layers": 2, "n_routed_experts": 8},
           "hosts": {"count": 2, "max_count": 4, "slots": 10},
           "load": {"tokens_per_s": 3000, "shifts_per_hour": 30, "drift_hours": 0.05},
           "autoscaling": {"target_tokens_per_s": 300, "max_replicas": 3, "upscale_delay_s": 1,
                           "downscale_delay_s": 5, "host_idle_s": 5},
           "policies": [{"name": "s", "kind": "static"},
                        {"name": "r", "kind": "replan", "replan_every_s": 30},
                        {"name": "m", "kind": "autoscale", "rebalance_every_s": 60}]}


def test_a_run_makes_no_reference_cycles_and_gives_the_collector_back_as_it_was():
    """`simulate` collects less often on the grounds that a run makes no cyclic garbage (what
    the collector would find); it restores the thresholds it found."""
    import dataclasses
    import gc

    sc = dataclasses.replace(Scenario.from_dict(_POLICY), duration_s=90.0)
    was = gc.get_threshold()
    gc.collect()
    gc.disable()
    try:
        simulate(sc)
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert gc.get_threshold() == was


def test_every_policy_keeps_slots_experts_and_autoscaler_bounds():
    sc = Scenario.from_dict(_POLICY)
    gen = Generated(sc)
    rates = gen.chunk(0, sc.periods)
    fleets = [Fleet(sc, p, rates[:60].mean(axis=0)) for p in sc.policies]
    a = sc.autoscaling
    for i, rate in enumerate(rates):
        for f in fleets:
            f.step(float(i + 1), rate)
            held = {}
            for hs in f.placement.values():
                assert len(set(hs)) == len(hs)  # two replicas of one expert never share a host
                for h in hs:
                    held[h] = held.get(h, 0) + 1
            assert all(held[h] <= f.capacity[h] for h in held)  # no host over its slots
            assert set(f.placement) == set(f.keys)  # every expert placed
            assert len(f.capacity) <= sc.hosts.max_count
            if f.pol.kind == "autoscale":
                assert all(a.min_replicas <= len(hs) <= a.max_replicas for hs in f.placement.values())
            if not f.loading:  # the layout that serves is the planned placement's, on the live hosts
                want = layout(f.placement, sorted(f.capacity), sc.model)
                got = f.layout
                assert got.hosts == want.hosts and got.count.tolist() == want.count.tolist()
                assert sorted(zip(got.key.tolist(), got.host.tolist(), strict=True)) == sorted(
                    zip(want.key.tolist(), want.host.tolist(), strict=True))
    moefleet = fleets[2]
    assert moefleet.adds > 0 and max(map(len, moefleet.placement.values())) > 1  # it did scale


@pytest.mark.parametrize("seed", range(8))
def test_new_hosts_counts_what_the_plain_comprehension_counts(seed):
    """A replan's adds: the same hosts, as often (order aside), as the plain form over random
    placements (keys new, gone, kept, moved, grown and shrunk)."""
    from collections import Counter

    from moefleet.sim.policies import _new_hosts

    rng = np.random.default_rng(seed)
    hosts = [f"h{i}" for i in range(6)]

    def some():
        return {(0, e): list(rng.choice(hosts, rng.integers(1, 4), replace=False))
                for e in range(40) if rng.random() < 0.8}

    was, now = some(), some()
    for k in list(now)[:10]:
        if k in was:
            now[k] = list(was[k])
    plain = [h for k, hs in now.items() if hs != was.get(k) for h in set(hs) - set(was.get(k) or ())]
    assert Counter(_new_hosts(was, now)) == Counter(plain)


# ---- scenario files -----------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"cost": {"tflops": "fast"}}, r"cost\.tflops: expected float"),
    ({"load": {"gini": 0.5}}, r"load\.gini must be \[lo, hi\]"),
    ({"hostz": {}}, r"scenario: unknown field\(s\) \['hostz'\]"),
    ({"policies": [{"name": "x", "kind": "eplb"}]}, r"policies\[x\]\.kind must be one of"),
    ({"autoscaling": {"smoothing": 2}}, r"autoscaling: autoscaling\.smoothing must be in \(0, 1\]"),
    ({"hosts": {"count": 1, "slots": 4}}, r"hosts: 1 × 4 slots cannot hold one replica of 64"),
])
def test_a_bad_scenario_names_its_field(change, message):
    with pytest.raises(SpecError, match=message):
        Scenario.from_dict({"name": "bad", **change})


def test_simulate_command_prints_the_table_and_writes_the_plots(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: cli\nduration_s: 60\nhosts: {count: 2, slots: 40}\n")
    r = CliRunner().invoke(main, ["simulate", str(scenario), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "SLO met" in r.output and "moefleet" in r.output and "replan" in r.output
    assert (tmp_path / "out" / "plots.png").stat().st_size > 1000
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ncost: {load_gbps: -1}\n")
    r = CliRunner().invoke(main, ["simulate", str(bad)])
    assert r.exit_code == 1 and "cost.load_gbps must be > 0" in r.output


def test_consolidation_drains_hosts_as_load_falls_and_keeps_the_invariants():
    """Load falls from its peak (t = 0) to its trough: without consolidation the hosts started
    for the peak stay (none empties by itself); with it, lightly used hosts are drained and
    retired while no host goes over its slots and every expert keeps a replica."""
    base = {"name": "fall", "duration_s": 12 * 3600, "model": {"layers": 2, "n_routed_experts": 8},
            "hosts": {"count": 2, "max_count": 8, "slots": 12},
            "load": {"tokens_per_s": 6000, "peak_hour": 0, "trough_ratio": 0.1, "poisson": False},
            "autoscaling": {"target_tokens_per_s": 300, "max_replicas": 6, "upscale_delay_s": 60,
                            "downscale_delay_s": 120, "period_s": 60, "host_idle_s": 300},
            "policies": [{"name": "m", "kind": "autoscale"}]}
    ends = {}
    for moves in (0, 24):
        a = {**base["autoscaling"], "consolidate_max_moves": moves}
        sc = Scenario.from_dict({**base, "autoscaling": a})
        rates = Generated(sc).chunk(0, sc.periods)
        f = Fleet(sc, sc.policies[0], rates[0])
        peak = 0
        for i, rate in enumerate(rates):
            f.step((i + 1) * 60.0, rate)
            held = {}
            for hs in f.placement.values():
                for h in hs:
                    held[h] = held.get(h, 0) + 1
            assert all(held[h] <= f.capacity[h] for h in held) and set(f.placement) == set(f.keys)
            peak = max(peak, len(f.capacity))
        ends[moves] = (peak, len(f.capacity))
    assert ends[0][1] == ends[0][0] >= 5  # the peak's hosts stay
    assert ends[24][1] <= 3  # 16 experts at ~1 replica each fit 2 hosts of 12 slots, with spare
