"""Per-expert load, one row per period: generated, or replayed from a trace file.

Generated: each layer's expert popularity is a fixed profile (lognormal or Zipf, calibrated to
that layer's target Gini) dealt to the experts in the order of a score that drifts slowly
(`drift_hours`) and is redrawn at abrupt domain shifts, so the Gini stays on target while the
hot set moves. The request rate follows a diurnal cosine (peak at `peak_hour`, down to
`trough_ratio`) with bursts. The measured rows per period are Poisson samples of the rate.

Replayed: a CSV (or, with pyarrow, Parquet) trace, in one of two formats:

    t,layer,expert,tokens        rows routed to one expert (t in seconds from the start)
    t,layer,experts              one token's top-k selection, ids separated by spaces ("3 7")

Rows are summed per period; what falls after the scenario's duration is dropped.
It knows nothing of placement, costs or policies.

    L = layers, E = experts per layer, N = L·E (n = layer · E + expert), P = periods;
    rates are rows/s (a token sent to K experts is K rows).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from .scenario import Scenario, SpecError

__all__ = ["gini", "popularity_profile", "Generated", "Replayed", "load_source", "read_trace"]

_DRIFT_STEP_S = 60.0  # popularity is recomputed this often (and at every shift)


def gini(x: np.ndarray) -> np.ndarray:
    """x: [..., E] non-negative weights -> [...] Gini coefficients (0 = even, → 1 = one hot)."""
    s = np.sort(np.asarray(x, dtype=np.float64), axis=-1)
    n = s.shape[-1]
    i = np.arange(1, n + 1)
    total = s.sum(axis=-1)
    return np.where(total > 0, ((2 * i - n - 1) * s).sum(axis=-1) / (n * np.maximum(total, 1e-300)), 0.0)


def popularity_profile(kind: str, n_experts: int, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """target: [L] Gini per layer -> [L, E] shares, hottest first, each row summing to 1, whose
    Gini equals its target (bisection on the lognormal's sigma or the Zipf exponent)."""
    L = len(target)
    if kind == "zipf":
        base = np.broadcast_to(-np.log(np.arange(1, n_experts + 1.0)), (L, n_experts))  # s · this
    else:
        base = -np.sort(-rng.standard_normal((L, n_experts)), axis=1)  # sigma · this
    lo, hi = np.zeros(L), np.full(L, 20.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        above = gini(np.exp(mid[:, None] * (base - base[:, :1]))) > target
        hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
    w = np.exp(lo[:, None] * (base - base[:, :1]))  # [L, E], the hottest is 1
    return w / w.sum(axis=1, keepdims=True)


class Generated:
    """The scenario's generated load; `chunk(start, n)` -> [n, N] measured rows/s."""

    def __init__(self, sc: Scenario):
        cfg, m = sc.load, sc.model
        self.cfg, self.period_s, self.k = cfg, sc.autoscaling.period_s, m.num_experts_per_tok
        self.L, self.E = m.layers, m.n_routed_experts
        rng = np.random.default_rng(cfg.seed)
        self.target = rng.uniform(cfg.gini[0], cfg.gini[1], self.L)  # [L] Gini per layer
        self.profile = popularity_profile(cfg.popularity, self.E, self.target, rng)  # [L, E]
        self.shifts = _events(rng, cfg.shifts_per_hour, sc.duration_s)
        self.bursts = _events(rng, cfg.bursts_per_hour, sc.duration_s)
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._runs: tuple | None = None  # ((start, n), what runs(start, n) gave)

    def tokens_per_s(self, t: np.ndarray) -> np.ndarray:
        """t: [n] seconds -> [n] tokens/s into each layer: the diurnal curve times bursts."""
        c = self.cfg
        day = (1 + np.cos(2 * math.pi * (t / 3600.0 - c.peak_hour) / 24.0)) / 2  # 1 at the peak
        rate = c.tokens_per_s * (c.trough_ratio + (1 - c.trough_ratio) * day)
        if len(self.bursts):
            since = t[:, None] - self.bursts[None, :]
            rate = rate * np.where(((since >= 0) & (since < c.burst_s)).any(axis=1), c.burst_factor, 1.0)
        return rate

    def shares(self, t: float) -> np.ndarray:
        """-> [N] each expert's share of its layer's rows at time t (each layer sums to 1)."""
        seg = int(np.searchsorted(self.shifts, t, side="right"))
        step = int(t // _DRIFT_STEP_S)
        if (seg, step) not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[(seg, step)] = self._shares(seg, step * _DRIFT_STEP_S)
        return self._cache[(seg, step)]

    def _shares(self, seg: int, t: float) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, seg])
        z0, z1 = rng.standard_normal((2, self.L, self.E))
        theta = 0.5 * math.pi * t / (self.cfg.drift_hours * 3600.0) if self.cfg.drift_hours else 0.0
        order = np.argsort(-(math.cos(theta) * z0 + math.sin(theta) * z1), axis=1)  # [L, E] hottest first
        p = np.empty((self.L, self.E))
        np.put_along_axis(p, order, self.profile, axis=1)
        return p.reshape(-1)

    def chunk(self, start: int, n: int) -> np.ndarray:
        """Periods start .. start+n-1 -> [n, N] measured rows/s."""
        scale, runs = self.runs(start, n)
        rate = np.empty((n, self.L * self.E))  # [n, N] expected rows/s
        for i, j, p in runs:  # rows that share one popularity (a drift step) at once
            np.multiply(scale[i:j], p, out=rate[i:j])
        if not self.cfg.poisson:
            return rate
        rng = np.random.default_rng([self.cfg.seed, 1, start])
        return rng.poisson(rate * self.period_s) / self.period_s

    def runs(self, start: int, n: int) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]]]:
        """Periods start .. start+n-1 -> (scale [n, 1] rows/s into each layer, [(i, j, p)]: rows
        i..j-1 share the popularity p [N]). Without Poisson sampling, `chunk`'s row i is
        exactly scale[i] · p, so rows of one run differ by their scale alone. The last answer is
        kept: `chunk` asks first, its caller may ask again (the shares' small cache need not
        hold every popularity a chunk spans)."""
        if self._runs is not None and self._runs[0] == (start, n):
            return self._runs[1]
        t = (start + np.arange(n)) * self.period_s  # [n] each period's start
        scale = (self.tokens_per_s(t) * self.k)[:, None]  # [n, 1]
        out, i = [], 0
        while i < n:
            p = self.shares(float(t[i]))
            j = i + 1
            while j < n and self.shares(float(t[j])) is p:
                j += 1
            out.append((i, j, p))
            i = j
        self._runs = ((start, n), (scale, out))
        return scale, out


def _events(rng: np.random.Generator, per_hour: float, duration_s: float) -> np.ndarray:
    """Times of a Poisson process of `per_hour` events over the duration, sorted."""
    count = rng.poisson(per_hour * duration_s / 3600.0) if per_hour > 0 else 0
    return np.sort(rng.uniform(0, duration_s, count))


class Replayed:
    """A trace binned into periods; `chunk(start, n)` -> [n, N] rows/s."""

    def __init__(self, sc: Scenario):
        self.rates = read_trace(sc.load.trace, sc.model.layers, sc.model.n_routed_experts,
                                sc.autoscaling.period_s, sc.periods)

    def chunk(self, start: int, n: int) -> np.ndarray:
        return self.rates[start:start + n]


def load_source(sc: Scenario) -> Generated | Replayed:
    return Replayed(sc) if sc.load.trace else Generated(sc)


def read_trace(path: str, layers: int, n_experts: int, period_s: float, periods: int) -> np.ndarray:
    """A trace file -> [P, N] rows/s per period. Raises SpecError naming the bad row or column."""
    cols = _read_columns(path)
    t = np.asarray(cols["t"], dtype=np.float64)
    layer = np.asarray(cols["layer"], dtype=np.int64)
    if "experts" in cols:
        ids = [[int(e) for e in str(x).replace(",", " ").split()] if not isinstance(x, list) else x
               for x in cols["experts"]]
        reps = np.array([len(x) for x in ids])
        t, layer = np.repeat(t, reps), np.repeat(layer, reps)
        expert = np.array([e for x in ids for e in x], dtype=np.int64)
        tokens = np.ones(len(expert))
    elif "expert" in cols and "tokens" in cols:
        expert = np.asarray(cols["expert"], dtype=np.int64)
        tokens = np.asarray(cols["tokens"], dtype=np.float64)
    else:
        raise SpecError(f"{path}: columns must be t,layer,expert,tokens or t,layer,experts; "
                        f"got {sorted(cols)}")
    for name, v, hi in (("layer", layer, layers), ("expert", expert, n_experts)):
        bad = np.flatnonzero((v < 0) | (v >= hi))
        if len(bad):
            raise SpecError(f"{path}: {name} {v[bad[0]]} is out of range [0, {hi}) (row {bad[0] + 1})")
    p = np.floor(t / period_s).astype(np.int64)
    keep = (p >= 0) & (p < periods)
    out = np.zeros((periods, layers * n_experts))
    np.add.at(out, (p[keep], layer[keep] * n_experts + expert[keep]), tokens[keep])
    return out / period_s


def _read_columns(path: str) -> dict[str, list]:
    if not Path(path).is_file():
        raise SpecError(f"load.trace: no such file {path}")
    if Path(path).suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SpecError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(path).to_pydict()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SpecError(f"{path}: no rows")
    return {k.strip(): [r[k] for r in rows] for k in rows[0]}
