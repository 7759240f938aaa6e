"""Run a scenario: every policy on the same load, period by period, then summarise.

The load is drawn once per chunk of periods and fed to every policy, so the policies see the
same rows. Per period and policy it records hosts in use, p50/p99 layer latency (over the
layers, `cost.period_cost`), per-host max/mean rows and the weights moved so far.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from moefleet.cluster import autoscale

from .cost import (
    Profile,
    evaluate,
    layer_calls,
    layer_tokens,
    merged_tokens,
    profile,
    rows_given_calls,
    rows_per_call,
)
from .load import Generated, load_source
from .policies import Fleet
from .scenario import Scenario

__all__ = ["Series", "Summary", "simulate", "summarise", "table"]

_CHUNK = 256  # periods of load drawn at once
_SAME = 1e-9  # rows per call within this (relative) of the period before's: the profile still holds
_ROWS = 4  # rows of [n, N] compared at once (`_same_as_before`)
_EVALUATE = 32  # periods costed at once: [32, H, L] temporaries stay in cache
_GC_YOUNG = 50_000  # allocations between young collections while a run lasts (Python's default: 700)
_sum, _max, _min = np.add.reduce, np.maximum.reduce, np.minimum.reduce


@dataclass
class Series:
    """One policy's per-period record, each [P]."""

    hosts: np.ndarray
    p50_s: np.ndarray
    p99_s: np.ndarray
    imbalance: np.ndarray  # max / mean rows/s over the hosts in use
    replicas_moved: np.ndarray  # cumulative


@dataclass
class Summary:
    policy: str
    slo_attainment: float  # share of periods whose p99 layer latency <= slo_s
    gpu_hours: float
    replicas_moved: int
    gb_moved: float
    peak_imbalance: float
    mean_imbalance: float
    p99_ms_median: float  # median over periods of the p99 layer latency


def simulate(sc: Scenario, progress: bool = False) -> dict[str, Series]:
    """Every policy of `sc` over the same load -> policy name -> its per-period Series."""
    with _fewer_collections():
        return _simulate(sc, progress)


@contextmanager
def _fewer_collections():
    """Python's cyclic collector, less often while the block runs. The planners allocate many
    objects that live for a while (placements, plans, their keys) and leave no cyclic garbage
    (a unit test holds this), so at the default thresholds (a young collection every 700
    allocations) the collector took about a tenth of a run, walking objects that reference
    counting frees anyway. Every generation is still collected, each 70 times less often."""
    was = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG, *was[1:])
    try:
        yield
    finally:
        gc.set_threshold(*was)


def _simulate(sc: Scenario, progress: bool) -> dict[str, Series]:
    src, P = load_source(sc), sc.periods
    hour = min(P, max(1, int(3600 / sc.autoscaling.period_s)))
    first = sum(src.chunk(s, min(_CHUNK, hour - s)).sum(axis=0) for s in range(0, hour, _CHUNK)) / hour
    fleets = [Fleet(sc, p, first) for p in sc.policies]
    costed = {p.name: _Costed() for p in sc.policies}
    rec = {p.name: {f: np.zeros(P) for f in Series.__dataclass_fields__} for p in sc.policies}
    bar, last, load = _bar(P, progress), None, None
    for start in range(0, P, _CHUNK):
        rates = src.chunk(start, min(_CHUNK, P - start))  # [n, N]
        calls = layer_calls(sc.cost, sc.model, rates)  # [n, L]
        x = _Rows(sc.model, rates, calls)  # [n, N] rows per call (rows_per_call's x), made as asked for
        same = _same_rows(sc, src, start, x, last)  # [n]
        last = x
        runs = [_Chunk(sc, fleet, costed[fleet.pol.name], rec[fleet.pol.name], start, x, calls, same)
                for fleet in fleets]
        for i, rate in enumerate(rates):  # every fleet steps on the period's load while it is in cache
            load = autoscale.smooth(sc.autoscaling.smoothing, rate, load)  # the same for every fleet
            for run in runs:
                run.step(i, rate, load)
        for run in runs:
            run.cost()
        if bar is not None:
            bar.update(len(rates))
    if bar is not None:
        bar.close()
    return {name: Series(**r) for name, r in rec.items()}


class _Rows:
    """x [n, N] rows per call of a chunk (`rows_given_calls` of its rates [n, N] and calls
    [n, L]), a row made when first asked for: most periods keep their profile and need none."""

    def __init__(self, m, rates: np.ndarray, calls: np.ndarray):
        self.m, self.rates, self.calls = m, rates, calls
        self._rows: dict[int, np.ndarray] = {}
        self._all: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rates)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._all is not None:
            return self._all[i]
        i %= len(self.rates)
        row = self._rows.get(i)
        if row is None:
            row = self._rows[i] = rows_given_calls(self.m, self.rates[i], self.calls[i])
        return row

    def all(self) -> np.ndarray:
        if self._all is None:
            self._all = rows_given_calls(self.m, self.rates, self.calls)
        return self._all


def _same_rows(sc: Scenario, src, start: int, x: _Rows, last: _Rows | None) -> np.ndarray:
    """-> [n] `_same_as_before` of x and the last row of `last` (x[0] itself for the first
    chunk). Rows that `_scaled_runs` shows to be within _SAME of the row before are not compared."""
    runs = _scaled_runs(sc, src, start, x.calls)
    if runs is None:
        full = x.all()
        return _same_as_before(full, full[:1] if last is None else last[-1][None])
    same = np.ones(len(x), dtype=bool)
    for i in runs:  # the first row of each run: compared as _same_as_before compares it
        prev = x[i - 1] if i else (x[0] if last is None else last[-1])
        same[i] = _same_as_before(x[i][None], prev[None])[0]
    return same


def _scaled_runs(sc: Scenario, src, start: int, calls: np.ndarray) -> list[int] | None:
    """The first row of each run of rows that differ only by their scale, when every other row
    is sure to be within _SAME of the row before it; None when that is not sure.

    Generated load without Poisson sampling: row i of a run is fl(s_i · p) (`Generated.runs`),
    so rows_per_call's x_i = fl(fl(s_i · p_n) / c_il), c_il = fl(fl(fl(Σ_e fl(s_i · p_e)) / k) / b),
    is p_n · k · b / Σ_e p_e times (1 + θ_i), |θ_i| <= (E + 4) · 2^-53 (positive terms: no
    cancellation; each rounding is relative while every value is a normal number). Two rows of
    a run then differ by at most 2 (E + 4) · 2^-53 of either (under 1e-13 for E < 400), and their
    difference is computed exactly (Sterbenz), far inside _SAME = 1e-9; a share p_n = 0 gives
    0 in both. The bounds checked keep every value normal: 1e-100 <= s <= 1e100, p in [0, 1]
    with its positive shares >= 1e-200, k · b >= 1 and c >= 1e-290 (so x_n >= 1e-203 when
    p_n > 0)."""
    E = sc.model.n_routed_experts
    if (not isinstance(src, Generated) or src.cfg.poisson or E >= 400
            or not sc.model.num_experts_per_tok * sc.cost.batch_tokens >= 1
            or not (_min(calls, axis=None) >= 1e-290 and _max(calls, axis=None) < np.inf)):
        return None
    scale, runs = src.runs(start, len(calls))
    if not (_min(scale, axis=None) >= 1e-100 and _max(scale, axis=None) <= 1e100):  # NaN fails too
        return None
    for _, _, p in runs:
        if not (_min(p) >= 0 and _max(p) <= 1 and _min(p, initial=1.0, where=p > 0) >= 1e-200):
            return None
    return [i for i, _, _ in runs]


def _same_as_before(x: np.ndarray, last: np.ndarray) -> np.ndarray:
    """x: [n, N] rows per call, last: [1, N] the period before x[0] -> [n] whether each row is
    within _SAME (relative) of the row before it. A few rows at a time: the temporaries stay
    in cache."""
    out = np.empty(len(x), dtype=bool)
    d, tol = np.empty((2, _ROWS, x.shape[1]))  # [_ROWS, N] each, reused
    ok = np.empty((_ROWS, x.shape[1]), dtype=bool)
    for a in range(0, len(x), _ROWS):
        b = min(a + _ROWS, len(x))
        prev = x[a - 1:b - 1] if a else np.concatenate([last, x[:b - 1]])  # [b - a, N]
        m = b - a
        np.subtract(x[a:b], prev, out=d[:m])
        np.abs(d[:m], out=d[:m])
        np.abs(prev, out=tol[:m])
        tol[:m] *= _SAME
        np.less_equal(d[:m], tol[:m], out=ok[:m])
        out[a:b] = ok[:m].all(axis=1)
    return out


class _Costed:
    """A fleet's cost profile, the layout version it was made for, and its last latency [L]
    (the micro-batcher merges requests by how long the calls take)."""

    profile: Profile | None = None
    version = -1
    latency: np.ndarray | float = 0.0


class _Chunk:
    """One fleet through the periods start.. of a chunk: `step` each period, then `cost` them.

    The profile is made again only when the layout or the pattern of rows per call changed
    (`same` false). Without merging, the cost does not feed back into the steps, so the periods
    that one profile serves are costed together, after the steps."""

    def __init__(self, sc: Scenario, fleet: Fleet, costed: _Costed, r: dict[str, np.ndarray], start: int,
                 x: _Rows, calls: np.ndarray, same: np.ndarray):
        self.sc, self.fleet, self.costed, self.r, self.start = sc, fleet, costed, r, start
        self.x, self.calls, self.same = x, calls, same
        self.merging = sc.cost.max_wait_ms > 0
        self.latency = np.empty((len(calls), sc.model.layers))  # [n, L]
        # (first period, profile) of each span one profile serves
        self.spans: list[tuple[int, Profile]] = [] if costed.profile is None else [(0, costed.profile)]

    def step(self, i: int, rate: np.ndarray, load: np.ndarray) -> None:
        """Period start + i: rate [N] measured, load [N] its `autoscale.smooth`."""
        sc, fleet, costed, r, t = self.sc, self.fleet, self.costed, self.r, self.start + i
        fleet.step((t + 1) * sc.autoscaling.period_s, rate, load)  # t: the period's end
        r["hosts"][t] = len(fleet.capacity)
        r["replicas_moved"][t] = fleet.adds
        if self.merging:  # calls merged by the last period's latency: the pattern moves each period
            b = merged_tokens(sc.cost, layer_tokens(sc.model, rate), costed.latency)
            xi, ci = rows_per_call(sc.cost, sc.model, rate, b)
            costed.profile, costed.version = profile(sc.cost, sc.model, fleet.layout, xi), fleet.version
            cost = evaluate(sc.cost, costed.profile, ci)
            self.latency[i] = costed.latency = cost.latency_s
            r["imbalance"][t] = _imbalance(cost.host_rows)
        elif costed.profile is None or not self.same[i] or costed.version != fleet.version:
            costed.profile = profile(sc.cost, sc.model, fleet.layout, self.x[i])
            costed.version = fleet.version
            spans = self.spans
            if spans and spans[-1][0] == i:
                spans.pop()
            spans.append((i, costed.profile))

    def cost(self) -> None:
        """Latency and imbalance of every period stepped (those `step` has not costed itself)."""
        r, start, latency, n = self.r, self.start, self.latency, len(self.latency)
        if not self.merging:
            ends = [i for i, _ in self.spans[1:]] + [n]
            for (a, prof), b in zip(self.spans, ends, strict=True):
                for lo in range(a, b, _EVALUATE):
                    hi = min(lo + _EVALUATE, b)
                    cost = evaluate(self.sc.cost, prof, self.calls[lo:hi])
                    latency[lo:hi] = cost.latency_s
                    r["imbalance"][start + lo:start + hi] = _imbalance(cost.host_rows)
            self.costed.latency = latency[-1]
        p = slice(start, start + n)
        r["p50_s"][p] = np.quantile(latency, 0.5, axis=1, method="higher")
        r["p99_s"][p] = np.quantile(latency, 0.99, axis=1, method="higher")


def _imbalance(rows: np.ndarray) -> np.ndarray:
    """rows: [..., H] rows/s of each host -> [...] max / mean over the hosts (1.0 when idle)."""
    mean = _sum(rows, axis=-1) / rows.shape[-1]  # what .mean() does, without its checks
    return np.divide(_max(rows, axis=-1), mean, out=np.ones_like(mean), where=mean > 0)


def _bar(total: int, on: bool):
    if not on:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the `sim` extra is not installed: run without a bar
        return None
    return tqdm(total=total, unit="period", desc="simulating", leave=False)


def summarise(sc: Scenario, series: dict[str, Series]) -> list[Summary]:
    gb = sc.model.expert_bytes / 1e9
    out = []
    for name, s in series.items():
        moved = int(s.replicas_moved[-1])
        out.append(Summary(name, float(np.mean(s.p99_s <= sc.slo_s)),
                           float(s.hosts.sum() * sc.autoscaling.period_s / 3600), moved, moved * gb,
                           float(s.imbalance.max()), float(s.imbalance.mean()),
                           float(np.median(s.p99_s) * 1e3)))
    return out


def table(summaries: list[Summary], slo_s: float) -> str:
    head = (f"{'policy':<14} {'SLO met':>8} {'GPU-h':>9} {'replicas moved':>15} {'GB moved':>10} "
            f"{'peak max/mean':>14} {'mean max/mean':>14} {'p99 ms (median)':>16}")
    rows = [f"{s.policy:<14} {s.slo_attainment:>8.1%} {s.gpu_hours:>9.2f} {s.replicas_moved:>15d} "
            f"{s.gb_moved:>10.2f} {s.peak_imbalance:>14.2f} {s.mean_imbalance:>14.2f} "
            f"{s.p99_ms_median:>16.2f}"
            for s in summaries]
    return "\n".join([f"SLO: p99 layer latency <= {slo_s * 1e3:g} ms per period", head, *rows])
