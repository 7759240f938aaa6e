"""The admin gRPC API (`moefleet.v1.Admin`): validates, converts, delegates to the Controller.

Served on the router's port, beside the inference API. No logic of its own.
"""

from __future__ import annotations

from typing import Any

from moefleet.protos import admin_pb2 as pb
from moefleet.protos import admin_pb2_grpc as pb_grpc

__all__ = ["AdminServicer", "status_to_proto", "status_from_proto"]


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, controller: Any):
        self._controller = controller

    async def Status(self, request, context):
        return status_to_proto(await self._controller.status.remote(request.model))


def status_to_proto(s: dict[str, Any]) -> pb.StatusResponse:
    models = [
        pb.ModelStatus(
            name=m["name"], routing_version=m["routing_version"], dtype=m["dtype"],
            hidden_size=m["hidden_size"],
            layers=[pb.LayerStatus(layer=L["layer"], experts=[
                pb.ExpertStatus(expert=e["expert"],
                                replicas=[pb.ReplicaStatus(**r) for r in e["replicas"]])
                for e in L["experts"]]) for L in m["layers"]],
        )
        for m in s["models"]
    ]
    hosts = [pb.HostStatus(**{k: h[k] for k in _HOST_FIELDS if k in h}) for h in s["hosts"]]
    return pb.StatusResponse(models=models, hosts=hosts)


_HOST_FIELDS = ("id", "node_id", "node_ip", "device", "slots_total", "slots_used")


def status_from_proto(r: pb.StatusResponse) -> dict[str, Any]:
    """The inverse of `status_to_proto`, as plain data with real ints (for json/yaml)."""
    return _plain(r)


def _plain(value: Any) -> Any:
    """A message as dicts, lists and Python scalars (int64 stays an int, unlike proto JSON)."""
    if hasattr(value, "DESCRIPTOR"):
        return {f.name: _plain(getattr(value, f.name)) for f in value.DESCRIPTOR.fields}
    if isinstance(value, (str, bytes, int, float, bool)):
        return value
    return [_plain(v) for v in value]
