"""The Controller's Rebalance, its pure part: the plan for the knob, what a plan that places
fewer replicas than asked says, and the report the call answers with. No Ray, no effects.
"""

from __future__ import annotations

from typing import Any

from moefleet.core.errors import FailedPrecondition

from . import placement
from .placement import Placement, PlacementPlan
from .registry import Key, ModelRecord

__all__ = ["plan", "shortfall", "report"]


def plan(m: ModelRecord, load: dict[Key, float], capacity: dict[str, int], current: Placement,
         total: int, max_moves: int, min_gain: float) -> PlacementPlan:
    """placement.rebalance with the knob (`registry.rebalance_knob`'s; max_moves 0: no limit)."""
    try:
        return placement.rebalance(load, capacity, current, total, max_replicas=len(capacity),
                                   max_moves=max_moves or None, min_gain=min_gain)
    except ValueError as e:
        raise FailedPrecondition(f"model {m.name!r}: {e}; nothing changed") from None


def shortfall(model: str, placed: int, total: int, capacity: dict[str, int]) -> str:
    return (f"model {model!r}: placed {placed} of {total} replicas asked for ({total - placed} "
            f"unplaced): {len(capacity)} hosts with {sum(capacity.values())} slots in all, and "
            f"at most one replica of an expert per host")


def report(load: dict[Key, float], capacity: dict[str, int], current: Placement, done: PlacementPlan,
           scratch: Placement, total: int, placed: int, version: int) -> dict[str, Any]:
    """The Rebalance answer: moves against a plan from scratch, balance before and after (per
    replica and per host), and what the knob cut (`uncut`)."""
    uncut = done.uncut or done
    return {"routing_version": version, "moves": len(done.moves),
            "moves_from_scratch": _distance(current, scratch),
            "imbalance_before": _imbalance(placement.replica_loads(load, current)),
            "imbalance_after": _imbalance(placement.replica_loads(load, done.placement)),
            "host_imbalance_before": placement.imbalance(load, capacity, current),
            "host_imbalance_after": placement.imbalance(load, capacity, done.placement),
            "replicas_requested": total, "replicas_placed": placed,
            "moves_uncut": len(uncut.moves),
            "host_imbalance_uncut": placement.imbalance(load, capacity, uncut.placement)}


def _imbalance(loads: list[float]) -> float:
    """max / mean of per-replica loads (1.0 is perfect)."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def _distance(a: Placement, b: Placement) -> int:
    """Replicas added plus removed to turn placement a into b."""
    pa = {(k, h) for k, hs in a.items() for h in hs}
    pb = {(k, h) for k, hs in b.items() for h in hs}
    return len(pa ^ pb)
