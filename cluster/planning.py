"""The placement planner's core: the types, per-host metrics, replica counts (`replicate`) and
`apply_counts`, over `_Fleet`, the mutable working copy of a placement that `rebalance`,
`Planner` and `drain` also plan on. `moefleet.cluster.placement` is the public face of it.

Two replicas of one expert never share a host, and no host holds more than its capacity.
"""

# Legend: K = (layer, expert id) key, H = host id, R = replica (one slot of one H holding one K).
#   load[K] = tokens/s routed to expert K; each of its replicas carries load[K] / replicas of K.

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Key", "Placement", "Move", "PlacementPlan", "host_loads", "replica_loads", "imbalance",
    "replicate", "apply_counts",
]

Key = tuple[int, int]             # (layer, expert id); ids need not be contiguous
Placement = dict[Key, list[str]]  # K -> ids of the hosts holding its replicas


@dataclass(frozen=True, slots=True)  # slots: a plan from scratch makes one per replica
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


def imbalance(load: dict[Key, float], capacity: dict[str, int], placement: Placement) -> float:
    """Per-host load, max / mean over the hosts with slots (1.0 is perfect; 1.0 when idle)."""
    host2load = host_loads(load, placement)
    hosts = {h for h, c in capacity.items() if c > 0} | set(host2load)
    mean = sum(host2load.values()) / max(len(hosts), 1)
    return max(host2load.values(), default=0.0) / mean if mean > 0 else 1.0


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
    items = sorted(load.items())  # by K (each K once); no lookup per K below
    logcnt = dict.fromkeys([k for k, _ in items], min_replicas)
    c = min_replicas  # every K's count so far
    extra = num_replicas - len(load) * min_replicas
    if c >= cap:  # no K may grow
        heap = []
    elif c:
        heap = [(-(v / c), k) for k, v in _contenders(items, c, extra)]
    else:
        heap = [(-_per_replica(v, c), k) for k, v in items]
    heapq.heapify(heap)
    for _ in range(extra):
        if not heap:
            break
        _, k = heapq.heappop(heap)
        logcnt[k] += 1
        if logcnt[k] < cap:
            heapq.heappush(heap, (-_per_replica(load[k], logcnt[k]), k))
    return logcnt


def _contenders(items: list[tuple[Key, float]], c: int, extra: int) -> list[tuple[Key, float]]:
    """The (K, load) of `items` that can win one of the `extra` replicas when each K has c >= 1:
    those whose load / c is at least the extra-th largest. Each pick takes the largest load /
    replicas left, and no later one of a K is larger than its first, so the first `extra` picks
    are all at least that: the others never win one. Every item when the loads are not all
    finite (their order is then the heap's own)."""
    if not 0 < extra < len(items):
        return items if extra else []
    per = np.fromiter((v for _, v in items), dtype=np.float64, count=len(items)) / c  # what v / c gives
    if not np.isfinite(per).all():
        return items
    least = np.partition(per, len(per) - extra)[len(per) - extra]  # the extra-th largest
    return [items[i] for i in np.flatnonzero(per >= least).tolist()]


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
        held, load, out = self.held, self.load, self.placement
        for k in sorted(placement):  # what add() does, inline: this loop is the planner's floor
            hs = placement[k]
            if len(hs) == 1:  # most K: no inner loop
                h = hs[0]
                out[k] = [h]
                held[h].add(k)
                load[h] += share[k]
                continue
            if not hs:
                continue
            if len(set(hs)) != len(hs):
                raise ValueError(f"expert {k} has two replicas on one host: {hs}")
            out[k] = list(hs)
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

    def place(self, pending: list[Key]) -> list[Key]:
        """Add each K of `pending`, in order, on `coolest` H for it, or else on the H that
        `_make_room` frees -> the K that found neither.

        `coolest`'s common case and `add` are written out here (the planner's inner loop): the
        heap's top entry, once checked, is the host that takes K, and the entry that replaces
        it goes in with one sift (the old one would only be dropped later)."""
        if self._heap is None:
            self.coolest(None)  # builds the heap
        heap, loads, held, capacity, share = self._heap, self.load, self.held, self.capacity, self.share
        placement, origin, by_share, log = self.placement, self.origin, self._by_share, self.log
        pop, replace = heapq.heappop, heapq.heapreplace
        unplaced, fresh = [], 0  # fresh: adds below not counted in `moved` yet (none is in origin)
        for k in pending:
            h = None
            while heap:
                load, n, top = heap[0]
                if load != loads[top] or n != len(held[top]) or capacity.get(top, 0) <= n:
                    pop(heap)
                    continue
                if k not in held[top]:
                    h = top
                break
            if not heap:  # no H has a free slot (each has an entry while it does): none fits
                unplaced.append(k)
                continue
            if h is None:  # every H with a free slot at the top holds K: the slow way
                h = self.coolest(k) or _make_room(self, k)
                if h is None:
                    unplaced.append(k)
                else:
                    self.add(k, h)
                continue
            hs = placement.get(k)  # add(k, h), written out
            if hs is None:
                placement[k] = [h]
            else:
                hs.append(h)
            if not origin:  # a pack from scratch: every add is new
                fresh += 1
            else:
                self.moved += -1 if h in origin.get(k, ()) else 1
            held[h].add(k)
            loads[h] = load = load + share[k]
            if by_share:  # only `_make_room` fills it
                by_share.pop(h, None)
            replace(heap, (load, n + 1, h))
            if log is not None:
                log.append((k, h, -1))
        self.moved += fresh
        return unplaced

    def hottest(self) -> str:
        """The most loaded H (ties: the largest id); `load` holds every H of `hosts`."""
        return max(zip(self.load.values(), self.load, strict=True))[1]


def _moved(origin: Placement, placement: Placement) -> int:
    """How many (K, H) pairs are in one placement and not the other (R added plus removed)."""
    if not origin:  # every R is new (a placement's lists hold distinct hosts, as _Fleet checks)
        return sum(map(len, placement.values()))
    was = origin.get
    moved = sum(len(set(was(k, ())).symmetric_difference(hs))
                for k, hs in placement.items() if was(k) != hs)
    return moved + sum(len(set(hs)) for k, hs in origin.items() if k not in placement)


def _shares(load: dict[Key, float], placement: Placement, counts: dict[Key, int]) -> dict[Key, float]:
    """K -> tokens/s of one R once K has counts[K] replicas (else as many as it has now)."""
    get = load.get
    out = dict.fromkeys(load.keys() - placement.keys(), 0.0)  # no replica now
    out.update({k: get(k, 0.0) / len(hs) if hs else 0.0 for k, hs in placement.items()})
    out.update({k: get(k, 0.0) / c if c else 0.0 for k, c in counts.items()})
    return out


def _sorted_hosts(hs: list[str]) -> list[str]:
    return hs if len(hs) == 1 else sorted(set(hs))


def _diff(current: Placement, placement: Placement) -> list[Move]:
    """The net moves, removes first (each add then finds its slot free)."""
    if not current:  # a plan from scratch: every R is an add
        return [Move("add", k, h) for k in sorted(placement) for h in _sorted_hosts(placement[k])]
    was = current.get
    changed = [k for k, hs in placement.items() if was(k) != hs]
    changed += [k for k in current if k not in placement]
    changed.sort()
    removes, adds, empty = [], [], ()
    for k in changed:
        old, new = current.get(k, empty), placement.get(k, empty)
        if len(old) == len(new) == 1 and old[0] != new[0]:  # most K: one replica moved
            removes.append(Move("remove", k, old[0]))
            adds.append(Move("add", k, new[0]))
            continue
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
    placement, unplaced = _counts_placement(load, capacity, current, counts)
    return PlacementPlan(placement, _diff(current, placement), unplaced)


def _counts_placement(load: dict[Key, float], capacity: dict[str, int], current: Placement,
                      counts: dict[Key, int], firsts_first: bool = False) -> tuple[Placement, list[Key]]:
    """`apply_counts`' placement and unplaced, without its moves; `firsts_first` as the
    retry that `apply_counts` makes when a K would be left with no replica."""
    fleet = _Fleet(capacity, current, _shares(load, current, counts))
    before = {k: len(current.get(k, ())) for k in counts} if current else dict.fromkeys(counts, 0)
    unplaced = _plan_counts(fleet, before, counts, firsts_first)
    if not firsts_first and any(k not in fleet.placement for k in unplaced):
        return _counts_placement(load, capacity, current, counts, True)
    return fleet.placement, unplaced


def _plan_counts(fleet: _Fleet, before: dict[Key, int], counts: dict[Key, int],
                 firsts_first: bool) -> list[Key]:
    """`apply_counts`' steps on `fleet` (before[K]: replicas K has there now) -> unplaced."""
    keys = sorted(counts)
    for k in keys:
        if before[k] > counts[k]:
            for _ in range(before[k] - counts[k]):
                fleet.remove(k, max(fleet.placement[k], key=lambda h: (fleet.load[h], h)))
    pending = [k for k in keys for _ in range(counts[k] - before[k])]
    pending.sort(key=fleet.share.__getitem__, reverse=True)  # heaviest first; ties keep key order
    if firsts_first:
        seen, firsts, rest = set(), [], []
        for k in pending:
            (rest if k in fleet.placement or k in seen else firsts).append(k)
            seen.add(k)
        pending = firsts + rest
    return fleet.place(pending)


def _make_room(fleet: _Fleet, k: Key) -> str | None:
    """When every free slot is on an H holding K: move some R `b` from an H without K into
    such a free slot, and return the H it left (now free for K); None when no such pair exists.
    Of the possible (b, from H, to H), the one that leaves the lower peak of the two hosts
    (ties: the smallest (b, from H, to H)); per pair of hosts, `_best_move` finds it."""
    slots, held = fleet.capacity.get, fleet.held
    free = [h for h in fleet.hosts if slots(h, 0) > len(held[h])]  # fleet.free(h) > 0
    if not free:  # every slot is taken: nothing can move
        return None
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
