"""`Planner`: `apply_counts` for a caller that plans every period at scale (the simulator),
keeping its placement between calls and taking the load as an array.
"""

# Legend: K = (layer, expert id) key, H = host id, R = replica (one slot of one H holding one K).
#   load[K] = tokens/s routed to expert K; each of its replicas carries load[K] / replicas of K.

from __future__ import annotations

from itertools import chain

import numpy as np

from .planning import Key, Placement, PlacementPlan, _diff, _Fleet, _plan_counts

__all__ = ["Planner"]


class _Shares:
    """share[K] for a fleet, read from an array over the planner's keys (no dict of N floats)."""

    def __init__(self, index: dict[Key, int], share: np.ndarray):
        self.index, self.array = index, share

    def __getitem__(self, k: Key) -> float:
        return float(self.array[self.index[k]])


class Planner:
    """`apply_counts` for a caller that plans every period at scale (the simulator).

    It keeps its placement between calls and takes the load as an array, so a call costs
    O(changes) in Python plus O(R) in numpy, where `apply_counts` costs O(R) in Python. Each call
    returns what `apply_counts(load, capacity, planner.placement, counts)` would (the same steps,
    `_plan_counts`, on the same host loads summed in the same order) and adopts that plan.

    keys: every K, sorted (load[n] is keys[n]'s tokens/s); capacity: H -> slots, the caller's
    own dict (hosts it adds or retires count from the next call); current: K -> [H].
    """

    def __init__(self, keys: list[Key], capacity: dict[str, int], current: Placement):
        if list(keys) != sorted(keys):
            raise ValueError("Planner keys must be sorted")
        self.keys, self.capacity = list(keys), capacity
        self.index = {k: n for n, k in enumerate(self.keys)}
        self.reset(current)

    def reset(self, current: Placement, own: bool = False) -> None:
        """Adopt a placement planned elsewhere (`rebalance`, `plan_from_scratch`): O(R).
        own: the caller hands `current` over (it neither keeps nor changes it afterwards), so
        it is taken as it is, not copied, unless it holds an empty list."""
        if own and all(current.values()):
            self.placement: Placement = current
        else:
            self.placement = {k: list(hs) for k, hs in current.items() if hs}
        self.held: dict[str, set[Key]] = {}
        self.hosts: list[str] = []  # every H seen; host index i in `at` is hosts[i]
        self._hid: dict[str, int] = {}
        flat = list(chain.from_iterable(self.placement.values()))  # [R] K by K, as _sync lays them
        for h in dict.fromkeys(flat):  # host indices in order of first sight
            self._host(h)
        held = self.held
        for k, hs in self.placement.items():
            if len(hs) == 1:
                held[hs[0]].add(k)
            else:
                for h in hs:
                    held[h].add(k)
        K = len(self.placement)
        per = np.fromiter(map(len, self.placement.values()), dtype=np.int64, count=K)  # [K placed]
        rows = np.repeat(np.fromiter(map(self.index.__getitem__, self.placement), dtype=np.int64, count=K),
                         per)  # [R]
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(per) - per, per)  # [R] place in its list
        width = int(per.max(initial=1))
        self.at = np.full((len(self.keys), width), -1, dtype=np.int64)  # [N, width] H index per R
        self.at[rows, cols] = np.fromiter(map(self._hid.__getitem__, flat), dtype=np.int64, count=len(flat))
        self.count = np.bincount(rows, minlength=len(self.keys))  # [N] R of K
        self._flat: tuple[np.ndarray, np.ndarray] | None = None  # `replicas()` when last made
        self._stale: dict[int, int] = {}  # K index -> its replicas in `_flat`, for rows changed since
        self._log: list[tuple[Key, str, int]] = []

    def apply_counts(self, load: np.ndarray, counts: dict[Key, int]) -> PlacementPlan:
        """load: [N] tokens/s; counts K -> target replicas -> the plan, now the planner's own.
        Its `placement` is the planner's (changed by the next call: copy it to keep it)."""
        if any(c < 0 for c in counts.values()):
            raise ValueError(f"replica counts must be >= 0: {counts}")
        plan = self._attempt(load, counts, firsts_first=False)
        if any(k not in self.placement for k in plan.unplaced):
            self.undo()
            plan = self._attempt(load, counts, firsts_first=True)
        return plan

    def undo(self) -> None:
        """Take back the last `apply_counts` (the caller will not carry it out)."""
        for k, h, i in reversed(self._log):
            if i < 0:
                self.placement[k].pop()
                if not self.placement[k]:
                    del self.placement[k]
                self.held[h].discard(k)
            else:
                self.placement.setdefault(k, []).insert(i, h)
                self.held[h].add(k)
        self._sync({k for k, _, _ in self._log})
        self._log = []

    def replicas(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (key [R], an index into keys; host [R], an index into `hosts`), K by K (read-only
        arrays, made again only after a change)."""
        if self._flat is None:
            valid = self.at >= 0
            self._flat = (np.nonzero(valid)[0], self.at[valid])
        elif self._stale:
            self._flat = self._patched()
        else:
            return self._flat
        self._stale = {}
        for a in self._flat:
            a.flags.writeable = False
        return self._flat

    def _patched(self) -> tuple[np.ndarray, np.ndarray]:
        """`replicas()` made anew from the last one, with the rows of `_stale` K taken from `at`:
        O(changed K) in Python plus one O(R) copy."""
        key, host = self._flat
        ns = sorted(self._stale)
        starts = np.searchsorted(key, ns).tolist()  # where each changed K's replicas began
        keys, hosts, prev, at = [], [], 0, self.at
        for n, i, c in zip(ns, starts, self.count[ns].tolist(), strict=True):
            keys += [key[prev:i], np.full(c, n, dtype=key.dtype)]  # K by K, as np.repeat would
            hosts += [host[prev:i], at[n, :c]]
            prev = i + self._stale[n]
        return np.concatenate(keys + [key[prev:]]), np.concatenate(hosts + [host[prev:]])

    def _attempt(self, load: np.ndarray, counts: dict[Key, int], firsts_first: bool) -> PlacementPlan:
        count = self.count.copy()  # [N] replicas now
        ns = [self.index[k] for k in counts]
        before = dict(zip(counts, count[ns].tolist(), strict=True))
        count[ns] = list(counts.values())
        if count.min(initial=1) > 0:  # every K keeps a replica (the simulator's min_replicas >= 1)
            share = load / count  # [N]: what the masked divide below gives then, without its mask
        else:
            share = np.divide(load, count, out=np.zeros(len(self.keys)), where=count > 0)
        hosts = sorted(set(self.capacity) | {h for h, ks in self.held.items() if ks})
        for h in hosts:
            self._host(h)
        key, host = self.replicas()  # K in sorted order, each K's H in list order, as _Fleet sums
        sums = np.bincount(host, share[key], minlength=len(self.hosts)).tolist()
        loads = {h: sums[self._hid[h]] for h in hosts}
        fleet = _Fleet.adopt(self.capacity, hosts, self.placement, self.held, loads,
                             _Shares(self.index, share))
        unplaced = _plan_counts(fleet, before, counts, firsts_first)
        self._log = fleet.log
        touched = sorted({k for k, _, _ in fleet.log})
        rows = self.at[[self.index[k] for k in touched]].tolist()
        was = {k: [self.hosts[i] for i in row if i >= 0] for k, row in zip(touched, rows, strict=True)}
        self._sync(touched)
        now = {k: self.placement[k] for k in touched if k in self.placement}
        return PlacementPlan(self.placement, _diff({k: v for k, v in was.items() if v}, now), unplaced)

    def _host(self, h: str) -> int:
        if h not in self._hid:
            self._hid[h] = len(self.hosts)
            self.hosts.append(h)
            self.held.setdefault(h, set())
        return self._hid[h]

    def _sync(self, keys) -> None:
        """The rows of `at`, `count` (and `held`) of these K (each once) from `placement`."""
        index, placement, held, hid = self.index, self.placement, self.held, self._hid
        ns, rows, cols, ids, lens = [], [], [], [], []
        for k in keys:
            n = index[k]
            ns.append(n)
            hs = placement.get(k, ())
            lens.append(len(hs))
            for j, h in enumerate(hs):
                rows.append(n)
                cols.append(j)
                ids.append(hid[h] if h in hid else self._host(h))
                held[h].add(k)
        if max(lens, default=0) > self.at.shape[1]:
            self.at = np.pad(self.at, ((0, 0), (0, max(lens) - self.at.shape[1])), constant_values=-1)
        if self._flat is not None:
            for n, c in zip(ns, self.count[ns].tolist(), strict=True):
                self._stale.setdefault(n, c)
        self.at[ns] = -1
        self.at[rows, cols] = ids
        self.count[ns] = lens
