"""Placement: which host holds which expert replica. Pure functions over plain data.

`initial_placement` deals one replica per expert round-robin over host slots (service bring-up).
The planner below decides, from measured per-expert load, how many replicas each expert gets
(EPLB-style `replicate`) and on which hosts they sit, and turns a current placement into a new
one with few moves (`apply_counts`, `rebalance`), or packs one afresh (`plan_from_scratch`).
`rebalance` is never less balanced than a plan from scratch (per-host max/mean, `imbalance`,
within _TOLERANCE), and a knob trades balance against moves (`max_moves`, `min_gain`).
Two replicas of one expert never share a host, and no host holds more than its capacity.
`Planner` is `apply_counts` for callers that plan every period at scale (the simulator): it
keeps its placement between calls. `hosts_to_drain` and `drain` empty lightly used hosts
(consolidation), keeping every expert's replica count.

It does not know about slots' indices, weights, GPUs, the routing table or the clock: a plan is
a list of adds and removes, and the executor decides when and how to carry them out. It does
not start hosts either; a replica that fits nowhere is reported in `PlacementPlan.unplaced`.
"""

# Legend: K = (layer, expert id) key, H = host id, R = replica (one slot of one H holding one K).
#   load[K] = tokens/s routed to expert K; each of its replicas carries load[K] / replicas of K.

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Key", "Placement", "Move", "PlacementPlan", "initial_placement", "host_loads",
    "replica_loads", "imbalance", "replicate", "apply_counts", "Planner", "plan_from_scratch",
    "rebalance", "hosts_to_drain", "drain",
]

_SLACK = 0.01  # rebalance stops migrating once the hottest host is within 1% of `_floor`
_TOLERANCE = 0.005  # rebalance takes the fewest moves within 0.5% of the best max/mean

Key = tuple[int, int]             # (layer, expert id); ids need not be contiguous
Placement = dict[Key, list[str]]  # K -> ids of the hosts holding its replicas


@dataclass(frozen=True)
class Move:
    op: str  # "add" or "remove"
    key: Key
    host: str


@dataclass(frozen=True)
class PlacementPlan:
    placement: Placement  # the new placement; a K with no replica is absent
    moves: list[Move]     # removes, then adds, that turn the current placement into it
    unplaced: list[Key]   # one entry per replica that found no host (slots or distinct hosts ran out)
    uncut: PlacementPlan | None = None  # what `rebalance` would have chosen without its knob


# ---------------------------------------------------------------------------- bring-up

def initial_placement(
    layers: list[int], n_experts: int, host_slots: list[int]
) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """host_slots[h]: free slots of host h -> {(layer, expert): [(host, slot)]}.

    Raises ValueError when the hosts cannot hold one replica of every expert.
    """
    need, have = len(layers) * n_experts, sum(host_slots)
    if need > have:
        raise ValueError(f"{need} experts ({len(layers)} layers × {n_experts}) need {need} slots; "
                         f"the hosts have {have}: raise hosts.count or hosts.slots")
    used = [0] * len(host_slots)
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    h = 0
    for layer in layers:
        for e in range(n_experts):
            while used[h] >= host_slots[h]:
                h = (h + 1) % len(host_slots)
            out[(layer, e)] = [(h, used[h])]
            used[h] += 1
            h = (h + 1) % len(host_slots)
    return out


# ---------------------------------------------------------------------------- metrics

def host_loads(load: dict[Key, float], placement: Placement) -> dict[str, float]:
    """load[K] tokens/s, placement K -> [H] -> host2load H -> tokens/s (hosts with no R absent).

    A K missing from `load` counts as load 0.
    """
    host2load: dict[str, float] = {}
    for k, hosts in placement.items():
        for h in hosts:
            host2load[h] = host2load.get(h, 0.0) + load.get(k, 0.0) / len(hosts)
    return host2load


def replica_loads(load: dict[Key, float], placement: Placement) -> list[float]:
    """load[K] tokens/s, placement K -> [H] -> [R] tokens/s carried by each replica."""
    return [load.get(k, 0.0) / len(hosts) for k, hosts in placement.items() for _ in hosts]


# ---------------------------------------------------------------------------- replica counts

def replicate(
    load: dict[Key, float], num_replicas: int, min_replicas: int = 1, max_replicas: int | None = None
) -> dict[Key, int]:
    """load[K] tokens/s -> logcnt K -> replicas, summing to num_replicas (less if max caps it).

    Every K gets min_replicas; each further R goes to the K with the highest load / replicas
    (ties: smallest K) that is below max_replicas. Raises ValueError when num_replicas cannot
    give every K its min_replicas.
    """
    cap = math.inf if max_replicas is None else max_replicas
    if min_replicas < 0 or cap < min_replicas:
        raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {min_replicas}, {max_replicas}")
    if num_replicas < len(load) * min_replicas:
        raise ValueError(f"{num_replicas} replicas cannot give {len(load)} experts "
                         f"{min_replicas} each")
    logcnt = {k: min_replicas for k in sorted(load)}
    heap = [(-_per_replica(load[k], c), k) for k, c in logcnt.items() if c < cap]
    heapq.heapify(heap)
    for _ in range(num_replicas - len(load) * min_replicas):
        if not heap:
            break
        _, k = heapq.heappop(heap)
        logcnt[k] += 1
        if logcnt[k] < cap:
            heapq.heappush(heap, (-_per_replica(load[k], logcnt[k]), k))
    return logcnt


def _per_replica(tokens_per_s: float, count: int) -> float:
    if count == 0:
        return math.inf if tokens_per_s > 0 else 0.0
    return tokens_per_s / count


# ---------------------------------------------------------------------------- working copy

class _Fleet:
    """Mutable working copy of a placement: every R of K weighs share[K] on its host."""

    def __init__(self, capacity: dict[str, int], placement: Placement, share: dict[Key, float],
                 origin: Placement | None = None):
        self.capacity, self.share = capacity, share
        self.origin: Placement = origin or {}  # K -> [H] that `moved` counts from
        self.placement: Placement = {}
        self.hosts = sorted(set(capacity).union(*placement.values()))
        self.held: dict[str, set[Key]] = {h: set() for h in self.hosts}  # H -> keys it holds
        self.load = dict.fromkeys(self.hosts, 0.0)                       # H -> tokens/s
        self._heap: list[tuple[float, int, str]] | None = None  # (load, replicas, H), built on use
        self.log: list[tuple[Key, str, int]] | None = None  # see `adopt`
        self._by_share: dict[str, list[tuple[float, Key]]] = {}  # see `by_share`
        held, load = self.held, self.load
        for k in sorted(placement):  # what add() does, inline: this loop is the planner's floor
            hs = placement[k]
            if not hs:
                continue
            if len(hs) > 1 and len(set(hs)) != len(hs):
                raise ValueError(f"expert {k} has two replicas on one host: {hs}")
            self.placement[k] = list(hs)
            s = share[k]
            for h in hs:
                held[h].add(k)
                load[h] += s
        self.moved = _moved(self.origin, self.placement)  # replicas added plus removed since origin

    @classmethod
    def adopt(cls, capacity: dict[str, int], hosts: list[str], placement: Placement,
              held: dict[str, set[Key]], load: dict[str, float], share) -> _Fleet:
        """A fleet over state the caller keeps (`Planner`), changed in place, each change logged
        in `log` as (K, H, index of H in placement[K] before a remove; -1 for an add)."""
        fleet = cls.__new__(cls)
        fleet.capacity, fleet.share, fleet.origin, fleet.moved = capacity, share, {}, 0
        fleet.placement, fleet.hosts, fleet.held, fleet.load = placement, hosts, held, load
        fleet._heap, fleet.log, fleet._by_share = None, [], {}
        return fleet

    def add(self, k: Key, h: str) -> None:
        self.placement.setdefault(k, []).append(h)
        self.moved += -1 if h in self.origin.get(k, ()) else 1
        held = self.held[h]
        held.add(k)
        self.load[h] = load = self.load[h] + self.share[k]
        self._by_share.pop(h, None)  # what _changed does, inline: the planner's inner loop
        if self._heap is not None:
            heapq.heappush(self._heap, (load, len(held), h))
        if self.log is not None:
            self.log.append((k, h, -1))

    def remove(self, k: Key, h: str) -> None:
        i = self.placement[k].index(h)
        del self.placement[k][i]
        if self.log is not None:
            self.log.append((k, h, i))
        if not self.placement[k]:
            del self.placement[k]
        self.moved += 1 if h in self.origin.get(k, ()) else -1
        self.held[h].discard(k)
        self.load[h] -= self.share[k]
        self._changed(h)

    def by_share(self, h: str) -> list[tuple[float, Key]]:
        """H's keys as (share, K), sorted; cached until H changes."""
        if h not in self._by_share:
            self._by_share[h] = sorted((self.share[k], k) for k in self.held[h])
        return self._by_share[h]

    def _changed(self, h: str) -> None:
        self._by_share.pop(h, None)
        if self._heap is not None:  # the old entry of h goes stale; coolest() drops it
            heapq.heappush(self._heap, (self.load[h], len(self.held[h]), h))

    def free(self, h: str) -> int:
        return self.capacity.get(h, 0) - len(self.held[h])

    def coolest(self, k: Key) -> str | None:
        """The least-loaded H with a free slot that does not hold K (ties: fewer R, then id).

        A heap of (load, replicas, H) with lazy deletion: entries that no longer match their
        host, or whose host is full, are dropped as they surface (a host that frees a slot is
        pushed again), so each call costs O(log H) plus the hosts skipped for holding K."""
        if self._heap is None:
            self._heap = [(self.load[h], len(self.held[h]), h) for h in self.hosts]
            heapq.heapify(self._heap)
        heap, loads, held, capacity = self._heap, self.load, self.held, self.capacity
        while heap:  # the common case first: the top entry, once valid, does not hold K
            load, n, h = heap[0]
            if load != loads[h] or n != len(held[h]) or capacity.get(h, 0) <= n:
                heapq.heappop(heap)
            elif k in held[h]:
                break
            else:
                return h
        skipped, best = [], None
        while self._heap:
            entry = heapq.heappop(self._heap)
            load, n, h = entry
            if load != self.load[h] or n != len(self.held[h]) or self.free(h) <= 0:
                continue
            skipped.append(entry)
            if k not in self.held[h]:
                best = h
                break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return best

    def hottest(self) -> str:
        return max(self.hosts, key=lambda h: (self.load[h], h))


def _moved(origin: Placement, placement: Placement) -> int:
    """How many (K, H) pairs are in one placement and not the other (R added plus removed)."""
    was = origin.get
    moved = sum(len(set(was(k, ())).symmetric_difference(hs))
                for k, hs in placement.items() if was(k) != hs)
    return moved + sum(len(set(hs)) for k, hs in origin.items() if k not in placement)


def _shares(load: dict[Key, float], placement: Placement, counts: dict[Key, int]) -> dict[Key, float]:
    """K -> tokens/s of one R once K has counts[K] replicas (else as many as it has now)."""
    out, in_load, in_counts = {}, load.get, counts.get
    for k in load.keys() | placement.keys() | counts.keys():
        c = in_counts(k)
        if c is None:
            c = len(placement.get(k, ()))
        out[k] = in_load(k, 0.0) / c if c else 0.0
    return out


def _diff(current: Placement, placement: Placement) -> list[Move]:
    """The net moves, removes first (each add then finds its slot free)."""
    if not current:  # a plan from scratch: every R is an add
        return [Move("add", k, h) for k in sorted(placement) for h in sorted(set(placement[k]))]
    was = current.get
    changed = [k for k, hs in placement.items() if was(k) != hs]
    changed += [k for k in current if k not in placement]
    changed.sort()
    removes, adds, empty = [], [], ()
    for k in changed:
        old, new = current.get(k, empty), placement.get(k, empty)
        removes += [Move("remove", k, h) for h in sorted(set(old).difference(new))]
        adds += [Move("add", k, h) for h in sorted(set(new).difference(old))]
    return removes + adds


# ---------------------------------------------------------------------------- planning

def apply_counts(
    load: dict[Key, float], capacity: dict[str, int], current: Placement, counts: dict[Key, int]
) -> PlacementPlan:
    """Change replica counts with the fewest moves.

    load[K] tokens/s; capacity[H] = total slots of H for this placement (R already in `current`
    count against it); current K -> [H]; counts K -> target replicas (0 drops K, a K absent from
    `counts` keeps its replicas, a K absent from `current` starts from 0).
    Kept R stay where they are. A shrinking K first loses its R on the most loaded H. New R go,
    heaviest per-replica load first (LPT), to the least-loaded H with a free slot without K.
    When that would leave some K with no replica at all, the first R of every K goes first.
    """
    if any(c < 0 for c in counts.values()):
        raise ValueError(f"replica counts must be >= 0: {counts}")
    plan = _apply_counts(load, capacity, current, counts, firsts_first=False)
    if any(k not in plan.placement for k in plan.unplaced):
        plan = _apply_counts(load, capacity, current, counts, firsts_first=True)
    return plan


def _apply_counts(load: dict[Key, float], capacity: dict[str, int], current: Placement,
                  counts: dict[Key, int], firsts_first: bool) -> PlacementPlan:
    fleet = _Fleet(capacity, current, _shares(load, current, counts))
    before = {k: len(current.get(k, ())) for k in counts}
    unplaced = _plan_counts(fleet, before, counts, firsts_first)
    return PlacementPlan(fleet.placement, _diff(current, fleet.placement), unplaced)


def _plan_counts(fleet: _Fleet, before: dict[Key, int], counts: dict[Key, int],
                 firsts_first: bool) -> list[Key]:
    """`apply_counts`' steps on `fleet` (before[K]: replicas K has there now) -> unplaced."""
    for k in sorted(counts):
        for _ in range(before[k] - counts[k]):
            fleet.remove(k, max(fleet.placement[k], key=lambda h: (fleet.load[h], h)))
    pending = [k for k in sorted(counts) for _ in range(counts[k] - before[k])]
    pending.sort(key=lambda k: -fleet.share[k])  # stable: ties keep key order
    if firsts_first:
        seen, firsts, rest = set(), [], []
        for k in pending:
            (rest if k in fleet.placement or k in seen else firsts).append(k)
            seen.add(k)
        pending = firsts + rest
    unplaced = []
    for k in pending:
        h = fleet.coolest(k) or _make_room(fleet, k)
        if h is None:
            unplaced.append(k)
        else:
            fleet.add(k, h)
    return unplaced


def _make_room(fleet: _Fleet, k: Key) -> str | None:
    """When every free slot is on an H holding K: move some R `b` from an H without K into
    such a free slot, and return the H it left (now free for K); None when no such pair exists.
    Of the possible (b, from H, to H), the one that leaves the lower peak of the two hosts
    (ties: the smallest (b, from H, to H)); per pair of hosts, `_best_move` finds it."""
    free = [h for h in fleet.hosts if fleet.free(h) > 0]
    best = None
    for src in fleet.hosts:
        if k in fleet.held[src] or fleet.capacity.get(src, 0) <= 0:
            continue
        for dst in free:
            move = _best_move(fleet, k, src, dst)
            if move is not None and (best is None or move < best):
                best = move
    if best is None:
        return None
    _, b, src, dst = best
    fleet.remove(b, src)
    fleet.add(b, dst)
    return src


def _best_move(fleet: _Fleet, k: Key, src: str, dst: str) -> tuple[float, Key, str, str] | None:
    """min over R b on src not on dst of (peak, b, src, dst), peak = the hotter of the two once
    b moves (and K takes its slot): O(log R) by bisection, as peak(share of b) falls then rises.

    src's R sorted by (share, b): dst's load + share grows along them, src's load - share +
    share[K] shrinks (float rounding keeps both monotone). The minimum over the R not on dst is
    at the first such R on either side of where they cross; equal peaks around it are scanned
    for the smallest b."""
    order = fleet.by_share(src)
    l_dst, l_src, s_k, held = fleet.load[dst], fleet.load[src], fleet.share[k], fleet.held[dst]

    def peak(i: int) -> float:
        s = order[i][0]
        return max(l_dst + s, l_src - s + s_k)

    lo, hi = 0, len(order)
    while lo < hi:  # the first i where dst's side is the hotter
        mid = (lo + hi) // 2
        s = order[mid][0]
        lo, hi = (lo, mid) if l_dst + s >= l_src - s + s_k else (mid + 1, hi)
    left, right = lo - 1, lo
    while left >= 0 and order[left][1] in held:
        left -= 1
    while right < len(order) and order[right][1] in held:
        right += 1
    sides = [peak(i) for i in (left, right) if 0 <= i < len(order)]
    if not sides:
        return None
    m, found = min(sides), []
    for i, step in ((left, -1), (right, 1)):
        while 0 <= i < len(order) and peak(i) <= m:
            if order[i][1] not in held:
                found.append(order[i][1])
            i += step
    return m, min(found), src, dst


# ---------------------------------------------------------------------------- consolidation

def hosts_to_drain(host_replicas: dict[str, int], capacity: dict[str, int], max_moves: int,
                   min_hosts: int, spare: float) -> list[str]:
    """Which lightly used hosts to empty now, so that they can be retired: O(H).

    host_replicas[H] = replicas H holds now; capacity[H] slots. Hosts holding replicas, fewest
    first (fewest moves per host freed), while their replicas total at most max_moves, at
    least min_hosts hosts with replicas stay, and the hosts that stay keep at least `spare` (a
    share) of their slots free once they hold every replica. Empty hosts are left to
    `autoscale.retirable`.
    """
    live = sorted((n, h) for h, n in host_replicas.items() if n > 0 and capacity.get(h, 0) > 0)
    total = sum(n for n, _ in live)
    slots = sum(capacity[h] for _, h in live)
    out, moves = [], 0
    for n, h in live:
        slots -= capacity[h]
        if (moves + n > max_moves or len(live) - len(out) - 1 < min_hosts
                or total > (1 - spare) * slots):
            break
        out.append(h)
        moves += n
    return out


def drain(load: dict[Key, float], capacity: dict[str, int], current: Placement,
          hosts: list[str]) -> tuple[PlacementPlan, list[str]]:
    """Move every replica off `hosts` -> (the plan, the hosts it empties).

    load[K] tokens/s; capacity[H] slots; current K -> [H]. Host by host, each replica, heaviest
    first, goes to the least-loaded H with a free slot that does not hold K and is not being
    drained (as `apply_counts` places a new one). A host whose replicas do not all find room
    keeps them all: a half-drained host saves nothing. Counts are unchanged; moves are the net
    change from `current` (each replica moved is one remove and one add).
    """
    closed = set(hosts)
    fleet = _Fleet({h: 0 if h in closed else c for h, c in capacity.items()}, current,
                   _shares(load, current, {}))
    emptied = []
    for src in hosts:
        added = []
        for k in sorted(fleet.held.get(src, ()), key=lambda k: (-fleet.share[k], k)):
            dst = fleet.coolest(k)  # src holds K, so it is never picked
            if dst is None:
                break
            fleet.add(k, dst)
            added.append((k, dst))
        if len(added) < len(fleet.held.get(src, ())):
            for k, dst in added:
                fleet.remove(k, dst)
            continue
        for k, _ in added:
            fleet.remove(k, src)
        emptied.append(src)
    return PlacementPlan(fleet.placement, _diff(current, fleet.placement), []), emptied


# ---------------------------------------------------------------------------- planning every period

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

    def reset(self, current: Placement) -> None:
        """Adopt a placement planned elsewhere (`rebalance`, `plan_from_scratch`): O(R)."""
        self.placement: Placement = {k: list(hs) for k, hs in current.items() if hs}
        self.held: dict[str, set[Key]] = {}
        self.hosts: list[str] = []  # every H seen; host index i in `at` is hosts[i]
        self._hid: dict[str, int] = {}
        rows, cols, ids, host = [], [], [], self._host
        for k, hs in self.placement.items():  # what _sync does, key by key
            n = self.index[k]
            for j, h in enumerate(hs):
                rows.append(n)
                cols.append(j)
                ids.append(host(h))
                self.held[h].add(k)
        width = max(map(len, self.placement.values()), default=1)
        self.at = np.full((len(self.keys), width), -1, dtype=np.int64)  # [N, width] H index per R
        self.at[rows, cols] = ids
        self.count = np.bincount(np.asarray(rows, dtype=np.int64), minlength=len(self.keys))  # [N] R of K
        self._flat: tuple[np.ndarray, np.ndarray] | None = None  # `replicas()`, until `at` changes
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
        for k in {k for k, _, _ in self._log}:
            self._sync(k)
        self._log = []

    def replicas(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (key [R], an index into keys; host [R], an index into `hosts`), K by K (read-only
        arrays, made again only after a change)."""
        if self._flat is None:
            valid = self.at >= 0
            self._flat = (np.nonzero(valid)[0], self.at[valid])
            for a in self._flat:
                a.flags.writeable = False
        return self._flat

    def _attempt(self, load: np.ndarray, counts: dict[Key, int], firsts_first: bool) -> PlacementPlan:
        count = self.count.copy()  # [N] replicas now
        before = {k: int(count[self.index[k]]) for k in counts}
        count[[self.index[k] for k in counts]] = list(counts.values())
        share = np.divide(load, count, out=np.zeros(len(self.keys)), where=count > 0)  # [N]
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
        was = {k: [self.hosts[i] for i in self.at[self.index[k]] if i >= 0] for k in touched}
        for k in touched:
            self._sync(k)
        now = {k: self.placement[k] for k in touched if k in self.placement}
        return PlacementPlan(self.placement, _diff({k: v for k, v in was.items() if v}, now), unplaced)

    def _host(self, h: str) -> int:
        if h not in self._hid:
            self._hid[h] = len(self.hosts)
            self.hosts.append(h)
            self.held.setdefault(h, set())
        return self._hid[h]

    def _sync(self, k: Key) -> None:
        """Row K of `at` (and `held`) from placement[K]."""
        hs = self.placement.get(k, [])
        if len(hs) > self.at.shape[1]:
            self.at = np.pad(self.at, ((0, 0), (0, len(hs) - self.at.shape[1])), constant_values=-1)
        n = self.index[k]
        row = self.at[n]
        row[:] = -1
        row[:len(hs)] = [self._host(h) for h in hs]
        self.count[n], self._flat = len(hs), None
        for h in hs:
            self.held[h].add(k)


def plan_from_scratch(
    load: dict[Key, float], capacity: dict[str, int], num_replicas: int,
    min_replicas: int = 1, max_replicas: int | None = None,
) -> PlacementPlan:
    """Greedy replicate-and-pack (the EPLB-style baseline), ignoring where replicas sit now.

    load[K] tokens/s; capacity[H] slots. Counts come from `replicate`; all R are packed heaviest
    first onto the least-loaded H with a free slot without K. moves are all adds.
    """
    counts = replicate(load, num_replicas, min_replicas, max_replicas)
    return apply_counts(load, capacity, {}, counts)


def rebalance(
    load: dict[Key, float], capacity: dict[str, int], current: Placement,
    num_replicas: int | None = None, min_replicas: int = 1, max_replicas: int | None = None,
    *, max_moves: int | None = None, min_gain: float = 0.0,
) -> PlacementPlan:
    """Migration-aware replan: the plan with the fewest moves among the best balanced ones.

    load[K] tokens/s (a K in `current` but not in `load` counts as 0); capacity[H] slots;
    current K -> [H]; num_replicas defaults to the replicas in `current`.
    Candidates, each followed step by step: the new counts from `replicate` applied with
    `apply_counts` then relieved by a bounded local search (one R moved off the hottest H, or
    swapped for a lighter R, per step); the same search from `current` when its counts already
    fit num_replicas; and a from-scratch pack, before and after the search, its hosts
    relabelled to keep as many R in place as possible.
    Choice: fewest unplaced R first; then, by default, the fewest moves whose `imbalance` is
    within _TOLERANCE of the best. max_moves keeps only plans with that many moves or fewer
    (ValueError when none has); min_gain > 0 instead takes the plan minimising imbalance +
    min_gain * moves (a move must buy at least min_gain of max/mean). When a knob changed the
    choice, `uncut` is the plan it would have been. moves are the net change from `current`.
    """
    full = {k: load.get(k, 0.0) for k in sorted(set(load) | set(current))}
    if num_replicas is None:
        num_replicas = sum(len(hs) for hs in current.values())
    counts = replicate(full, num_replicas, min_replicas, max_replicas)
    starts = [apply_counts(full, capacity, current, counts)]
    kept = {k: len(current.get(k, ())) for k in full}
    cap = math.inf if max_replicas is None else max_replicas
    if kept != counts and sum(kept.values()) == num_replicas and all(
            min_replicas <= c <= cap for c in kept.values()):
        starts.append(PlacementPlan(current, [], []))
    paths = [_Path(full, capacity, current, s.placement, s.unplaced) for s in starts]
    packed = apply_counts(full, capacity, {}, counts)
    scratch = _Path(full, capacity, {}, packed.placement, packed.unplaced)
    for i in (0, len(scratch.steps)):  # before and after its search, each relabelled
        relabelled = _relabel(scratch.placement_at(i), capacity, current)
        paths.append(_Path(full, capacity, current, relabelled, scratch.unplaced))
    plans = [(p, i) for p in paths for i in range(len(p.scores))]
    scores = [p.scores[i] for p, i in plans]
    best, pick = _choose(scores, None, 0.0), _choose(scores, max_moves, min_gain)
    if pick is None:
        least = min(s[2] for s in scores)
        raise ValueError(f"max_moves={max_moves} is below the {least} moves the fewest-move "
                         f"plan for {num_replicas} replicas needs")
    plan = plans[pick][0].plan(plans[pick][1], current)
    if pick == best:
        return plan
    return dataclasses.replace(plan, uncut=plans[best][0].plan(plans[best][1], current))


def imbalance(load: dict[Key, float], capacity: dict[str, int], placement: Placement) -> float:
    """Per-host load, max / mean over the hosts with slots (1.0 is perfect; 1.0 when idle)."""
    host2load = host_loads(load, placement)
    hosts = {h for h, c in capacity.items() if c > 0} | set(host2load)
    mean = sum(host2load.values()) / max(len(hosts), 1)
    return max(host2load.values(), default=0.0) / mean if mean > 0 else 1.0


def _choose(scores: list[tuple[int, float, int]], max_moves: int | None,
            min_gain: float) -> int | None:
    """scores[i] = (unplaced, imbalance, moves) -> the index chosen (see `rebalance`)."""
    fewest = min(s[0] for s in scores)
    pool = [i for i, s in enumerate(scores)
            if s[0] == fewest and (max_moves is None or s[2] <= max_moves)]
    if not pool:
        return None
    if min_gain > 0:
        return min(pool, key=lambda i: (scores[i][1] + min_gain * scores[i][2], scores[i][2]))
    good = (1 + _TOLERANCE) * min(scores[i][1] for i in pool)
    return min((i for i in pool if scores[i][1] <= good), key=lambda i: (scores[i][2], scores[i][1]))


class _Path:
    """The local search from `start` (its R that found no host: `unplaced`), step by step:
    scores[i] = (unplaced, imbalance, moves from the origin) after i steps, and
    `plan(i, current)` the plan then.

    At most one step per R, while the step leaves both hosts below the hottest H's load and
    that load is more than _SLACK above `_floor`.
    """

    def __init__(self, load: dict[Key, float], capacity: dict[str, int], origin: Placement,
                 start: Placement, unplaced: list[Key]):
        self.start, self.unplaced, self.capacity = start, unplaced, capacity
        self.share = _shares(load, start, {})
        fleet = _Fleet(capacity, start, self.share, origin)
        usable = sum(1 for h in fleet.hosts if capacity.get(h, 0) > 0) or len(fleet.hosts)
        mean = sum(fleet.load.values()) / max(usable, 1)
        good_enough = (1 + _SLACK) * _floor(fleet)
        self.steps: list[list[tuple[Key, str, str]]] = []
        self.scores = [self._score(fleet, mean)]
        for _ in range(sum(len(hs) for hs in start.values())):
            if fleet.load[fleet.hottest()] <= good_enough:
                break
            trades = _relieve_hottest(fleet)
            if not trades:
                break
            self.steps.append(trades)
            self.scores.append(self._score(fleet, mean))
        self.end = fleet.placement  # the placement after every step

    def _score(self, fleet: _Fleet, mean: float) -> tuple[int, float, int]:
        peak = fleet.load[fleet.hottest()] if fleet.hosts else 0.0
        return len(self.unplaced), peak / mean if mean > 0 else 1.0, fleet.moved

    def plan(self, i: int, current: Placement) -> PlacementPlan:
        placement = self.placement_at(i)
        return PlacementPlan(placement, _diff(current, placement), self.unplaced)

    def placement_at(self, i: int) -> Placement:
        """A copy of the placement after i steps (as a `_Fleet` that replays them holds it)."""
        if i == 0:
            return {k: list(self.start[k]) for k in sorted(self.start) if self.start[k]}
        if i == len(self.steps):
            return {k: list(hs) for k, hs in self.end.items()}
        fleet = _Fleet(self.capacity, self.start, self.share)
        for trades in self.steps[:i]:
            _trade(fleet, trades)
        return fleet.placement


def _relabel(placement: Placement, capacity: dict[str, int], current: Placement) -> Placement:
    """The same placement with its hosts' contents permuted onto the hosts that hold most of
    them now.

    Greedy matching on (R already in place) per (planned H, current H), largest first, a host's
    contents only going to a host with the slots for them.
    """
    held = dict.fromkeys(capacity, 0)  # planned H -> its R, hosts beyond capacity as they come
    for h, n in Counter(h for hs in placement.values() for h in hs).items():
        held[h] = held.get(h, 0) + n
    overlap = Counter((src, dst) for k, hs in placement.items()
                      for dst in current.get(k, ()) if dst in capacity for src in hs)
    to: dict[str, str] = {}
    taken: set[str] = set()
    pairs = sorted(overlap, key=lambda p: (-overlap[p], p))
    pairs += [(s, d) for s in sorted(held, key=lambda s: -held[s]) for d in sorted(capacity)]
    for src, dst in pairs:
        if src not in to and dst not in taken and held[src] <= capacity[dst]:
            to[src] = dst
            taken.add(dst)
    if len(to) < len(held):  # the contents do not fit a permutation: keep the plan's hosts
        return placement
    return {k: [to[h] for h in hs] for k, hs in placement.items()}


def _floor(fleet: _Fleet) -> float:
    """A lower bound on the hottest H for these replicas: the even share, or the heaviest R."""
    usable = [h for h in fleet.hosts if fleet.capacity.get(h, 0) > 0] or fleet.hosts
    even = sum(fleet.load.values()) / max(len(usable), 1)
    return max([even] + [fleet.share[k] for k in fleet.placement])


def _relieve_hottest(fleet: _Fleet) -> list[tuple[Key, str, str]]:
    """Take the step off the hottest H that lowers its pair's peak most; its trades, [] if none.

    A step moves one R to another H, or, when no single move helps, swaps one R of the hottest
    H for a lighter R of another H (hosts full, or every move would overshoot).
    """
    hot = fleet.hottest()
    steps = _single_moves(fleet, hot) or _swaps(fleet, hot)
    if not steps:
        return []
    _, trades = min(steps)
    _trade(fleet, trades)
    return trades


def _trade(fleet: _Fleet, trades: list[tuple[Key, str, str]]) -> None:
    """Move each (K, from H, to H): all removes first, so a swap between full hosts fits."""
    for k, src, _ in trades:
        fleet.remove(k, src)
    for k, _, dst in trades:
        fleet.add(k, dst)


_Step = tuple[float, list[tuple[Key, str, str]]]  # (the pair's new peak, [(K, from H, to H)])


def _single_moves(fleet: _Fleet, hot: str) -> list[_Step]:
    steps = []
    for k in sorted(fleet.held[hot]):
        dst = fleet.coolest(k)
        if dst is not None:
            steps.append((_peak(fleet, hot, dst, fleet.share[k]), [(k, hot, dst)]))
    return [step for step in steps if step[0] < fleet.load[hot] * (1 - 1e-9)]


def _swaps(fleet: _Fleet, hot: str) -> list[_Step]:
    """Per other H and R `a` on the hottest, the R `b` whose swap best evens the pair."""
    steps = []
    for h in fleet.hosts:
        gap = fleet.load[hot] - fleet.load[h]  # the swap should shift about gap / 2
        theirs = sorted((fleet.share[b], b) for b in fleet.held[h] - fleet.held[hot])
        for a in sorted(fleet.held[hot] - fleet.held[h]):
            i = bisect.bisect_left(theirs, (fleet.share[a] - gap / 2,))
            for s_b, b in theirs[max(i - 1, 0): i + 1]:
                d = fleet.share[a] - s_b
                if 0 < d < gap:
                    steps.append((_peak(fleet, hot, h, d), [(a, hot, h), (b, h, hot)]))
    return [step for step in steps if step[0] < fleet.load[hot] * (1 - 1e-9)]


def _peak(fleet: _Fleet, src: str, dst: str, shift: float) -> float:
    """The hotter of src and dst once `shift` tokens/s go from src to dst."""
    return max(fleet.load[src] - shift, fleet.load[dst] + shift)
