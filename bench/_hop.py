"""The bare hops `bench/service.py` and `bench/transport.py` measure the service against.

    client ──gRPC──► HopFront (a grpc.aio server in an async actor, as the Router runs it)
                         ──one call, by the router's own Transport (Ray or gRPC)──► EchoHost
                         ◄── its input back, no maths

EchoHost answers both paths as an expert host does: `run` as a Ray actor call (numpy through
the object store) and the data-plane server of experts/dataplane.py, with the router's codec
and secret. So a bare hop costs exactly what the service's transport costs, and nothing else.
"""

from __future__ import annotations

import grpc
import numpy as np
import ray
import torch

from moefleet.experts import dataplane
from moefleet.protos import inference_pb2_grpc
from moefleet.protos.oip import decode_infer, encode_infer
from moefleet.router.dispatch import HostBatch
from moefleet.router.transport import HostLink, Transport

__all__ = ["EchoHost", "HopFront", "SECRET"]

SECRET = "bench-secret"


class EchoHost:
    """Answers both paths with its input (slot ids and counts are ignored)."""

    def __init__(self):
        self._server, self.address = dataplane.serve(
            lambda x, _s, _c: x, ray.util.get_node_ip_address(), SECRET)

    def run(self, x: np.ndarray, dtype: str, slot_ids: list[int], counts: list[int]) -> tuple:
        return x, dtype

    def dataplane_address(self) -> str:
        return self.address


def batch_of(x: torch.Tensor) -> HostBatch:
    """All of x's rows for slot 0."""
    return HostBatch(0, 0, x.shape[0], torch.tensor([0]), torch.tensor([x.shape[0]]))


class _HopServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, transport: Transport | None, link: HostLink):
        self._transport, self._link = transport, link

    async def ModelInfer(self, request, context):  # noqa: N802
        call = decode_infer(request)
        y = call.x
        if self._transport is not None:
            y = await self._transport(self._link, call.x, batch_of(call.x))
        return encode_infer(call, y, {"routing_version": 0})


class HopFront:
    """A grpc.aio server inside a Ray actor, as the Router runs it, without the router; it
    reaches the echo host over `transport` ("ray" or "grpc"), or answers at once ("none")."""

    def __init__(self, echo, transport: str):
        self._echo, self._mode = echo, transport
        self._server = None

    async def start(self, host: str, port: int, max_message_bytes: int) -> int:
        link = HostLink(self._echo, await self._echo.dataplane_address.remote(), SECRET)
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]
        self._server = grpc.aio.server(options=opts)
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            _HopServicer(None if self._mode == "none" else Transport(self._mode), link), self._server)
        bound = self._server.add_insecure_port(f"{host}:{port}")
        await self._server.start()
        return bound

    async def stop(self) -> None:
        await self._server.stop(1.0)
