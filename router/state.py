"""The Controller→Router contract: one model's routing state at one routing version.

The Controller builds a `RoutingState` for every version it publishes (`Router.install`) and
for a router that asks (`Controller.routing_state`); the router turns it into the engine's
`ModelState`. Nothing else crosses from the Controller to a router. Frozen: a version, once
built, is never changed; the next one is a new `RoutingState`.

# E = routed experts of a layer, H = hidden
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moefleet.core.config import MoEConfig
from moefleet.core.dtypes import TORCH_DTYPES
from moefleet.experts.reference import SharedExperts

from .gating import Gate

__all__ = ["RoutingState", "LayerRouting", "HostEntry"]


@dataclass(frozen=True)
class HostEntry:
    """One expert host as the routers reach it: its id, its Ray actor handle, and the
    HOST:PORT of its gRPC data plane ("" when it serves none)."""

    id: str
    handle: Any
    dataplane: str = ""


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer: its gate (E rows of [H]), its shared experts, and where each routed
    expert's replicas are: expert id -> ((index into `RoutingState.hosts`, slot), ...)."""

    gate: Gate
    replicas: Mapping[int, tuple[tuple[int, int], ...]]
    shared: SharedExperts | None = None


@dataclass(frozen=True)
class RoutingState:
    """Everything a router needs to serve `model` at routing version `version`."""

    model: str
    version: int
    moe: MoEConfig
    dtype: str  # a `TORCH_DTYPES` name: what the hosts compute in
    layers: Mapping[int, LayerRouting]
    hosts: tuple[HostEntry, ...]  # every host some replica is on, in index order
    dataplane_secret: str = ""  # what a data-plane call must carry

    def __post_init__(self):
        if self.version < 0:
            raise ValueError(f"routing version {self.version} of {self.model!r} is negative")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: expected one of {list(TORCH_DTYPES)}")
        for layer, lr in self.layers.items():
            for expert, reps in lr.replicas.items():
                if any(not 0 <= h < len(self.hosts) for h, _ in reps):
                    raise ValueError(f"layer {layer} expert {expert}: a replica's host index is "
                                     f"not one of the {len(self.hosts)} hosts")
