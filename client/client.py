"""The Python client of a moefleet service: one MoE layer over gRPC.

    y = Client("localhost:50051").infer("tiny", layer=0, x=x)   # x: [T, H] torch or numpy

Speaks the Open Inference Protocol (any OIP server with moefleet's conventions answers it),
retries on UNAVAILABLE with backoff within a per-call deadline (a router that restarts is
back within seconds) and on an overload refusal after the time the router asks for (gRPC's
`grpc-retry-pushback-ms`), and spreads calls round-robin over several routers when the address
lists them ("10.0.0.1:50051,10.0.0.2:50051") or names them all (a `dns:///` name): a call
whose router is gone is retried on another. The admin calls send
the admin token, when one is given, as `authorization: Bearer <token>` metadata. With
`tls=True` or a `tls_ca` it speaks TLS (`tls_cert` + `tls_key`: a client certificate, for a
service that requires one).
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import grpc
import numpy as np
import torch

from moefleet.protos import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from moefleet.protos.oip import request_for, tensor_from_response

__all__ = ["Client"]

_MAX_MESSAGE = 1 << 30
_MAX_BACKOFF_S = 1.0
# gRPC waits 1 s, then up to 120 s, before reconnecting to an address that refused it; a
# restarted router is back sooner than that, so look again every 0.1 to 1 s.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", _MAX_MESSAGE),
                    ("grpc.max_send_message_length", _MAX_MESSAGE),
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                    ("grpc.lb_policy_name", "round_robin")]


class Client:
    def __init__(self, address: str, retries: int = 20, backoff_s: float = 0.05,
                 token: str | None = None, tls: bool = False, tls_ca: bytes | None = None,
                 tls_cert: bytes | None = None, tls_key: bytes | None = None):
        """address: HOST:PORT, several of them separated by commas, or any gRPC target name.
        A call that gets UNAVAILABLE is tried again up to `retries` times, after backoff_s,
        then twice as long each time (at most 1 s), never past its deadline; one refused for
        overload, after the pushback the router sends (at most 1 s).
        tls_ca: PEM of the CA to trust (default: the system's); tls_cert, tls_key: PEM."""
        target = _target(address)
        if tls or tls_ca is not None or tls_cert is not None:
            creds = grpc.ssl_channel_credentials(tls_ca, tls_key, tls_cert)
            self._channel = grpc.secure_channel(target, creds, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._infer = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._retries = retries
        self._backoff_s = backoff_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def infer(self, model: str, layer: int, x: torch.Tensor | np.ndarray,
              timeout_s: float | None = None) -> torch.Tensor | np.ndarray:
        """x: [T, H] fp32 / fp16 / bf16 -> y: [T, H], same type and dtype as x."""
        return self.infer_with_version(model, layer, x, timeout_s)[0]

    def infer_with_version(self, model: str, layer: int, x: torch.Tensor | np.ndarray,
                           timeout_s: float | None = None) -> tuple[Any, int]:
        """Like `infer`, also returning the routing-table version that served the request."""
        as_numpy = isinstance(x, np.ndarray)
        xt = torch.from_numpy(np.ascontiguousarray(x)) if as_numpy else x
        resp = self._call(self._infer.ModelInfer, request_for(model, layer, xt), timeout_s)
        y = tensor_from_response(resp)
        version = resp.parameters["routing_version"].int64_param
        return (y.numpy() if as_numpy else y), version

    def ready(self, timeout_s: float = 5.0) -> bool:
        return self._call(self._infer.ServerReady, inference_pb2.ServerReadyRequest(), timeout_s).ready

    # ---- admin (moefleet.v1.Admin); changes answer once they are published ----------------

    def status(self, model: str = "", timeout_s: float = 10.0) -> admin_pb2.StatusResponse:
        req = admin_pb2.StatusRequest(model=model)
        return self._call(self._admin.Status, req, timeout_s)

    def scale_expert(self, model: str, *, layer: int, expert: int | None = None, replicas: int,
                     timeout_s: float = 300.0) -> admin_pb2.ChangeResponse:
        """Set one expert's replica count, or every expert's of the layer (expert=None)."""
        req = admin_pb2.ScaleExpertRequest(model=model, layer=layer, expert=expert, replicas=replicas)
        return self._call(self._admin.ScaleExpert, req, timeout_s)

    def add_expert(self, model: str, *, layer: int, safetensors: bytes, expert: int | None = None,
                   group: int | None = None, timeout_s: float = 300.0) -> admin_pb2.ChangeResponse:
        """Add an expert from a safetensors file's bytes; the response names its id. Retried
        on UNAVAILABLE only with a given `expert` id (a retry then cannot add it twice)."""
        req = admin_pb2.AddExpertRequest(model=model, layer=layer, expert=expert, group=group,
                                         safetensors=safetensors)
        return self._call(self._admin.AddExpert, req, timeout_s, retry=expert is not None)

    def remove_expert(self, model: str, *, layer: int, expert: int,
                      timeout_s: float = 300.0) -> admin_pb2.ChangeResponse:
        req = admin_pb2.RemoveExpertRequest(model=model, layer=layer, expert=expert)
        return self._call(self._admin.RemoveExpert, req, timeout_s)

    def rebalance(self, model: str, *, replicas: int = 0, max_moves: int | None = None,
                  min_gain: float | None = None, allow_partial: bool = False,
                  timeout_s: float = 600.0) -> admin_pb2.RebalanceResponse:
        """Re-plan for the measured load; max_moves / min_gain trade balance for moves (unset:
        the spec's); allow_partial takes a plan that places fewer replicas than asked."""
        req = admin_pb2.RebalanceRequest(model=model, replicas=replicas, max_moves=max_moves,
                                         min_gain=min_gain, allow_partial=allow_partial)
        return self._call(self._admin.Rebalance, req, timeout_s)

    def set_autoscaling(self, model: str, *, enabled: bool, timeout_s: float = 30.0,
                        **policy: float | int | None) -> admin_pb2.AutoscalingStatus:
        """Switch the autoscaler; policy fields (target_tokens_per_s, min_replicas, ...) that
        are given change too."""
        req = admin_pb2.SetAutoscalingRequest(model=model, enabled=enabled, **policy)
        return self._call(self._admin.SetAutoscaling, req, timeout_s)

    def shutdown(self, *, grace_s: float = 5.0, timeout_s: float = 30.0) -> admin_pb2.ShutdownResponse:
        """Stop the whole service (it answers first, then goes away)."""
        return self._call(self._admin.Shutdown, admin_pb2.ShutdownRequest(grace_s=grace_s), timeout_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout_s: float | None, retry: bool = True):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        retries = self._retries if retry else 0
        for attempt in range(retries + 1):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as e:
                pause = _pause(e, self._backoff_s * 2**attempt)
                if (pause is None or attempt == retries
                        or (deadline is not None and time.monotonic() + pause >= deadline)):
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")


def _pause(e: grpc.RpcError, backoff_s: float) -> float | None:
    """How long to wait before trying a failed call again, or None if it should not be:
    UNAVAILABLE after backoff_s, an overload refusal after the router's pushback (capped)."""
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return min(backoff_s, _MAX_BACKOFF_S)
    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        pushback = dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
        if pushback is not None and pushback.isdigit():
            return min(int(pushback) / 1e3, _MAX_BACKOFF_S)
    return None


def _target(address: str) -> str:
    """A gRPC channel target: "a:1,b:2" lists several routers (IPv4 ones as an `ipv4:`
    target, otherwise each must resolve: use a `dns:///` name that lists them all)."""
    parts = [a.strip() for a in address.split(",") if a.strip()]
    if len(parts) <= 1:
        return address
    if all(_is_ipv4_port(a) for a in parts):
        return "ipv4:" + ",".join(parts)
    raise ValueError(f"several router addresses must be IPv4 HOST:PORT ({address!r}); for names, "
                     "use one DNS name that lists every router (dns:///routers.example:50051)")


def _is_ipv4_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return port.isdigit()
