"""`rebalance`: the migration-aware replan, the plan with the fewest moves among the best
balanced ones, found by a bounded local search from several starts (see its docstring).
"""

# Legend: K = (layer, expert id) key, H = host id, R = replica (one slot of one H holding one K).
#   load[K] = tokens/s routed to expert K; each of its replicas carries load[K] / replicas of K.

from __future__ import annotations

import bisect
import dataclasses
import math
import operator
from collections import Counter
from itertools import chain, islice

from .planning import (
    Key,
    Placement,
    PlacementPlan,
    _counts_placement,
    _diff,
    _Fleet,
    _shares,
    replicate,
)

__all__ = ["rebalance"]

_SLACK = 0.01  # rebalance stops migrating once the hottest host is within 1% of `_floor`
_TOLERANCE = 0.005  # rebalance takes the fewest moves within 0.5% of the best max/mean


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
    full = _full(load, current)
    if num_replicas is None:
        num_replicas = sum(len(hs) for hs in current.values())
    counts = replicate(full, num_replicas, min_replicas, max_replicas)
    starts = [_counts_placement(full, capacity, current, counts)]  # apply_counts' (placement, unplaced)
    kept = {k: len(current.get(k, ())) for k in full}
    cap = math.inf if max_replicas is None else max_replicas
    if kept != counts and sum(kept.values()) == num_replicas and all(
            min_replicas <= c <= cap for c in kept.values()):
        starts.append((current, []))
    paths = [_Path(full, capacity, current, *s) for s in starts]
    packed, unplaced = _counts_placement(full, capacity, {}, counts)  # its keys in packing order
    # sorted once here: each _Fleet, relabelling and copy made of it below sorts it again (cheap now)
    scratch = _Path(full, capacity, {}, {k: packed[k] for k in sorted(packed)}, unplaced)
    # before and after its search, each relabelled; once when it took no step (a second, equal
    # path could never be chosen over the first)
    for i in dict.fromkeys((0, len(scratch.steps))):
        relabelled = _relabel(scratch.placement_read(i), capacity, current)
        paths.append(_Path(full, capacity, current, relabelled, scratch.unplaced, scratch.share))
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


def _full(load: dict[Key, float], current: Placement) -> dict[Key, float]:
    """Every K of `load` or `current`, sorted, -> its load (0 where `load` has none). When
    `load` already holds every K of `current` in sorted order (the simulator's and the
    Controller's do), that is a copy of it: no sort of the keys' union."""
    keys = list(load)
    if load.keys() >= current.keys() and all(map(operator.lt, keys, islice(keys, 1, None))):
        return dict(load)
    return {k: load.get(k, 0.0) for k in sorted(set(load) | set(current))}


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
                 start: Placement, unplaced: list[Key], share: dict[Key, float] | None = None):
        """share: `_shares(load, start, {})` when the caller has it (a relabelled placement
        has the same replicas per K as the one it came from)."""
        self.start, self.unplaced, self.capacity = start, unplaced, capacity
        self.share = _shares(load, start, {}) if share is None else share
        fleet = _Fleet(capacity, start, self.share, origin)
        usable = sum(1 for h in fleet.hosts if capacity.get(h, 0) > 0) or len(fleet.hosts)
        mean = sum(fleet.load.values()) / max(usable, 1)
        good_enough = (1 + _SLACK) * _floor(fleet)
        self.steps: list[list[tuple[Key, str, str]]] = []
        hot = fleet.hottest() if fleet.hosts else None
        self.scores = [self._score(fleet, hot, mean)]
        for _ in range(sum(map(len, start.values()))):
            if fleet.load[hot] <= good_enough:
                break
            trades = _relieve_hottest(fleet, hot)
            if not trades:
                break
            hot = fleet.hottest()
            self.steps.append(trades)
            self.scores.append(self._score(fleet, hot, mean))
        self.end = fleet.placement  # the placement after every step

    def _score(self, fleet: _Fleet, hot: str | None, mean: float) -> tuple[int, float, int]:
        peak = 0.0 if hot is None else fleet.load[hot]
        return len(self.unplaced), peak / mean if mean > 0 else 1.0, fleet.moved

    def plan(self, i: int, current: Placement) -> PlacementPlan:
        placement = self.placement_at(i)
        return PlacementPlan(placement, _diff(current, placement), self.unplaced)

    def placement_read(self, i: int) -> Placement:
        """The placement after i steps, to read only: the path's own dict (in no particular key
        order) when it has one, else `placement_at(i)`."""
        if i == 0:
            return self.start
        if i == len(self.steps):
            return self.end
        return self.placement_at(i)

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
    for h, n in Counter(chain.from_iterable(placement.values())).items():
        held[h] = held.get(h, 0) + n
    overlap = Counter((src, dst) for k, hs in placement.items()
                      for dst in current.get(k, ()) if dst in capacity for src in hs)
    to: dict[str, str] = {}
    taken: set[str] = set()
    for src, dst in sorted(overlap, key=lambda p: (-overlap[p], p)):
        if src not in to and dst not in taken and held[src] <= capacity[dst]:
            to[src] = dst
            taken.add(dst)
    if len(to) < len(held):  # the rest, fullest first, each on the first free host it fits
        dsts = sorted(capacity)
        for src in sorted(held, key=lambda s: -held[s]):
            if src not in to:
                dst = next((d for d in dsts if d not in taken and held[src] <= capacity[d]), None)
                if dst is not None:
                    to[src] = dst
                    taken.add(dst)
    if len(to) < len(held):  # the contents do not fit a permutation: keep the plan's hosts
        return placement
    return {k: [to[hs[0]]] if len(hs) == 1 else [to[h] for h in hs] for k, hs in placement.items()}


def _floor(fleet: _Fleet) -> float:
    """A lower bound on the hottest H for these replicas: the even share, or the heaviest R."""
    usable = [h for h in fleet.hosts if fleet.capacity.get(h, 0) > 0] or fleet.hosts
    even = sum(fleet.load.values()) / max(len(usable), 1)
    return max(even, max(map(fleet.share.__getitem__, fleet.placement), default=even))


def _relieve_hottest(fleet: _Fleet, hot: str) -> list[tuple[Key, str, str]]:
    """Take the step off the hottest H, `hot`, that lowers its pair's peak most; its trades,
    [] if none.

    A step moves one R to another H, or, when no single move helps, swaps one R of the hottest
    H for a lighter R of another H (hosts full, or every move would overshoot).
    """
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
    """Of the moves of one R of the hottest H to `coolest` H for it, the one that leaves the
    lowest peak (ties: the smallest K), as a list of at most one step: each R not on the
    coolest H with a free slot goes there, so only the R on that H look further."""
    top = fleet.coolest(None)  # no H holds None: the coolest H with a free slot
    if top is None:
        return []
    load, share, mine = fleet.load, fleet.share, fleet.held[top]
    l_hot, l_top, limit = load[hot], load[top], load[hot] * (1 - 1e-9)
    best = None  # (peak, K, to H)
    for k in fleet.held[hot]:
        dst, l_dst = top, l_top
        if k in mine:
            dst = fleet.coolest(k)
            if dst is None:
                continue
            l_dst = load[dst]
        s = share[k]
        peak = max(l_hot - s, l_dst + s)  # the hotter of the two once s moves
        if peak < limit and (best is None or (peak, k) < best[:2]):
            best = (peak, k, dst)
    return [] if best is None else [(best[0], [(best[1], hot, best[2])])]


def _swaps(fleet: _Fleet, hot: str) -> list[_Step]:
    """Of the swaps of an R `a` of the hottest H for an R `b` of another H, `b` the lighter by
    less than the pair's gap and, per (a, H), one of the two whose share is nearest
    share[a] - gap / 2: the one that leaves the lowest peak (ties: the smallest a, H, b), as
    a list of at most one step.

    Hosts go coolest first. The pair's peak is at least its even split, (load[hot] + load[H])
    / 2, which only grows along them: once that is above the best peak found, no later host
    can do better, and the search stops."""
    load, held = fleet.load, fleet.held
    l_hot, mine = load[hot], held[hot]
    limit = l_hot * (1 - 1e-9)
    ours = [(fleet.share[a], a) for a in mine]
    best = None  # (peak, a, H, b)
    for l_h, h in sorted(zip(load.values(), load, strict=True)):
        if best is not None and (l_hot + l_h) / 2 * (1 - 1e-9) > best[0]:  # the margin: rounding
            break
        gap = l_hot - l_h  # the swap should shift about gap / 2
        if not gap > 0:
            continue
        theirs, other, half = fleet.by_share(h), held[h], gap / 2  # theirs: (share, b), sorted
        n = len(theirs)
        for s_a, a in ours:
            if a in other:
                continue
            j = bisect.bisect_left(theirs, (s_a - half,))
            left, right = j - 1, j  # the nearest b on either side that the hottest does not hold
            while left >= 0 and theirs[left][1] in mine:
                left -= 1
            while right < n and theirs[right][1] in mine:
                right += 1
            for i in (left, right):
                if 0 <= i < n:
                    s_b, b = theirs[i]
                    d = s_a - s_b
                    if 0 < d < gap:
                        peak = max(l_hot - d, l_h + d)  # the hotter once d shifts
                        if peak < limit and (best is None or (peak, a, h, b) < best):
                            best = (peak, a, h, b)
    if best is None:
        return []
    peak, a, h, b = best
    return [(peak, [(a, hot, h), (b, h, hot)])]
