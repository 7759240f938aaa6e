"""The router: gating, dispatch/combine, micro-batching, and the Router actor's gRPC face.

The pure parts are exported here; the actor lives in `moefleet.router.actor` (it needs Ray).
"""

from .dispatch import LayerTable, Plan, combine, plan
from .gating import Gate, route

__all__ = ["Gate", "route", "LayerTable", "Plan", "plan", "combine"]
