"""The admin gRPC API (`moefleet.v1.Admin`): checks the token, converts, delegates to the
Controller. Served on the router's port, beside the inference API: `admin_service` is what
the cluster hands each Router it starts. No logic of its own.

With an admin token configured, every call needs `authorization: Bearer <token>` metadata:
without it the call fails UNAUTHENTICATED, with a wrong one PERMISSION_DENIED.
"""

from __future__ import annotations

import hmac
from typing import Any

from moefleet.core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from moefleet.protos import admin_pb2 as pb
from moefleet.protos import admin_pb2_grpc as pb_grpc
from moefleet.router.server import Service

__all__ = ["AdminServicer", "admin_service", "status_to_proto", "status_from_proto"]


_MAX_GRACE_S = 3600.0  # a Shutdown's drain: an hour at most


def admin_service(controller: Any, token: str | None = None) -> Service:
    """The admin API as a service the Router serves beside inference, on its one port."""
    return (pb_grpc.add_AdminServicer_to_server, AdminServicer(controller, token),
            pb.DESCRIPTOR.services_by_name["Admin"].full_name)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, controller: Any, token: str | None = None):
        self._controller = controller
        self._token = token or None

    async def Status(self, request, context):
        self._authorize(context)
        return status_to_proto(await self._controller.status.remote(model=request.model))

    async def ScaleExpert(self, request, context):
        self._authorize(context)
        expert = request.expert if request.HasField("expert") else None
        return pb.ChangeResponse(**await self._controller.scale_expert.remote(
            model=request.model, layer=request.layer, expert=expert, replicas=request.replicas))

    async def AddExpert(self, request, context):
        self._authorize(context)
        expert = request.expert if request.HasField("expert") else None
        group = request.group if request.HasField("group") else None
        return pb.ChangeResponse(**await self._controller.add_expert.remote(
            model=request.model, layer=request.layer, safetensors=request.safetensors,
            expert=expert, group=group))

    async def RemoveExpert(self, request, context):
        self._authorize(context)
        return pb.ChangeResponse(**await self._controller.remove_expert.remote(
            model=request.model, layer=request.layer, expert=request.expert))

    async def Rebalance(self, request, context):
        self._authorize(context)
        knob = {f: getattr(request, f) for f in ("max_moves", "min_gain") if request.HasField(f)}
        return pb.RebalanceResponse(**await self._controller.rebalance.remote(
            model=request.model, replicas=request.replicas, allow_partial=request.allow_partial, **knob))

    async def SetAutoscaling(self, request, context):
        self._authorize(context)
        fields = {f: getattr(request, f) for f in _POLICY_FIELDS if request.HasField(f)}
        out = await self._controller.set_autoscaling.remote(model=request.model, enabled=request.enabled,
                                                            **fields)
        return pb.AutoscalingStatus(**{k: out[k] for k in ("enabled", *_POLICY_FIELDS)})

    async def Shutdown(self, request, context):
        self._authorize(context)
        grace_s = request.grace_s or 5.0
        if not 0 <= grace_s <= _MAX_GRACE_S:  # NaN too
            raise InvalidArgument(f"grace_s must be 0 … {_MAX_GRACE_S:g} s (0: the default, 5 s), "
                                  f"got {grace_s}")
        return pb.ShutdownResponse(models=await self._controller.shutdown_service.remote(grace_s=grace_s))

    def _authorize(self, context) -> None:
        if self._token is None:
            return
        given = dict(context.invocation_metadata()).get("authorization")
        if not given:
            raise Unauthenticated("admin calls need the admin token: `authorization: Bearer <token>` "
                                  "metadata (moefleet --token or $MOEFLEET_TOKEN)")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            raise PermissionDenied("the admin token does not match")


_POLICY_FIELDS = ("target_tokens_per_s", "min_replicas", "max_replicas", "upscale_delay_s",
                  "downscale_delay_s")


def status_to_proto(s: dict[str, Any]) -> pb.StatusResponse:
    models = [
        pb.ModelStatus(
            name=m["name"], routing_version=m["routing_version"], dtype=m["dtype"],
            hidden_size=m["hidden_size"],
            layers=[pb.LayerStatus(layer=L["layer"], experts=[
                pb.ExpertStatus(expert=e["expert"], group=e["group"],
                                tokens_per_s=e["tokens_per_s"], target_replicas=e["target_replicas"],
                                replicas=[pb.ReplicaStatus(**r) for r in e["replicas"]])
                for e in L["experts"]]) for L in m["layers"]],
            autoscaling=pb.AutoscalingStatus(**m["autoscaling"]),
            latency_p50_s=m["latency_p50_s"], latency_p99_s=m["latency_p99_s"],
            requests_per_s=m["requests_per_s"],
        )
        for m in s["models"]
    ]
    hosts = [pb.HostStatus(**{k: h[k] for k in _HOST_FIELDS if k in h}) for h in s["hosts"]]
    routers = [pb.RouterStatus(**r) for r in s.get("routers", [])]
    return pb.StatusResponse(models=models, hosts=hosts, routers=routers)


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
