"""Placement: which host holds which expert replica. Pure functions over plain data.

The planner, in the modules this one re-exports (`planning`: the types, `replicate`,
`apply_counts`; `rebalance`; `planner`: `Planner`; `consolidation`: `hosts_to_drain`, `drain`),
decides, from measured per-expert load, how many replicas each expert gets
(EPLB-style `replicate`) and on which hosts they sit, and turns a current placement into a new
one with few moves (`apply_counts`, `rebalance`), or packs one afresh (`plan_from_scratch`).
`rebalance` is never less balanced than a plan from scratch (per-host max/mean, `imbalance`,
within `rebalance._TOLERANCE`), and a knob trades balance against moves (`max_moves`, `min_gain`).
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

from .consolidation import drain, hosts_to_drain
from .planner import Planner
from .planning import (
    Key,
    Move,
    Placement,
    PlacementPlan,
    _counts_placement,
    _diff,
    apply_counts,
    host_loads,
    imbalance,
    replica_loads,
    replicate,
)
from .rebalance import rebalance

__all__ = [
    "Key", "Placement", "Move", "PlacementPlan", "host_loads",
    "replica_loads", "imbalance", "replicate", "apply_counts", "Planner", "plan_from_scratch",
    "pack_from_scratch", "rebalance", "hosts_to_drain", "drain",
]


def plan_from_scratch(
    load: dict[Key, float], capacity: dict[str, int], num_replicas: int,
    min_replicas: int = 1, max_replicas: int | None = None,
) -> PlacementPlan:
    """Greedy replicate-and-pack (the EPLB-style baseline), ignoring where replicas sit now.

    load[K] tokens/s; capacity[H] slots. Counts come from `replicate`; all R are packed heaviest
    first onto the least-loaded H with a free slot without K. moves are all adds.
    """
    placement, unplaced = pack_from_scratch(load, capacity, num_replicas, min_replicas, max_replicas)
    return PlacementPlan(placement, _diff({}, placement), unplaced)


def pack_from_scratch(
    load: dict[Key, float], capacity: dict[str, int], num_replicas: int,
    min_replicas: int = 1, max_replicas: int | None = None,
) -> tuple[Placement, list[Key]]:
    """`plan_from_scratch`'s (placement, unplaced), without its moves (every R would be an add),
    for a caller that only needs where the replicas go (the simulator packs every few minutes;
    making one `Move` per R was a good part of its cost)."""
    counts = replicate(load, num_replicas, min_replicas, max_replicas)
    return _counts_placement(load, capacity, {}, counts)
