"""Admission at the door: calls over `max_concurrent_rpcs` are refused when they arrive, before
their payload is read, rather than waiting unseen inside gRPC; health checks and metadata
calls still get through, and every slot comes back when its call ends, cancelled or not.

The server is the real `serve_grpc` (servicer + interceptor); the router behind it holds
every call until the test lets it go, so the open calls are exactly the ones the test made.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moefleet.protos import inference_pb2 as pb
from moefleet.protos import inference_pb2_grpc as pb_grpc
from moefleet.protos.oip import request_for, tensor_from_response
from moefleet.router.server import InferenceServicer, ServerLimits, serve_grpc
from tests.fake_router import FakeRouter

pytestmark = pytest.mark.unit

SLOTS = 3


class _Held(FakeRouter):
    """A router whose calls wait for `release`; `entered` counts calls that reached it."""

    def __init__(self):
        self.release = asyncio.Event()
        self.entered = 0

    async def submit(self, model, layer, x):
        self.entered += 1
        await self.release.wait()
        return x * 2, 1


async def _serve(router, infer_full=None):
    limits = ServerLimits(max_receive_bytes=8 << 20, max_send_bytes=8 << 20,
                          max_concurrent_rpcs=SLOTS, max_other_rpcs=2)
    servicers = [(pb_grpc.add_GRPCInferenceServiceServicer_to_server,
                  InferenceServicer(router, router.submit, 1 << 20),
                  pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)]
    server, port, _ = await serve_grpc(servicers, "127.0.0.1", 0, limits, infer_full=infer_full)
    return server, f"127.0.0.1:{port}"


async def _until(predicate, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


async def _refusals(stub, x: torch.Tensor, n: int) -> list[grpc.aio.AioRpcError]:
    async def one():
        try:
            await stub.ModelInfer(request_for("m", 0, x), timeout=30)
        except grpc.aio.AioRpcError as e:
            return e
        raise AssertionError("an infer call over the limit was served")
    return await asyncio.gather(*(one() for _ in range(n)))


async def _scenario() -> None:
    router = _Held()
    full = []  # the door tells the router's admission of each call it refused for want of a slot
    server, address = await _serve(router, infer_full=lambda: full.append(1))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            x = torch.randn(2, 4)
            held = [asyncio.ensure_future(stub.ModelInfer(request_for("m", 0, x), timeout=30))
                    for _ in range(SLOTS)]
            await _until(lambda: router.entered == SLOTS)

            # Over the limit, while the server waits on nothing: refused, never queued. One
            # of them carries 4 MiB, which the server never has to read.
            big = torch.randn(1 << 18, 4)
            refused = await _refusals(stub, x, 8) + await _refusals(stub, big, 1)
            assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert all(dict(e.trailing_metadata())["grpc-retry-pushback-ms"] == "50" for e in refused)
            assert "calls open" in refused[0].details()
            assert router.entered == SLOTS and len(full) == 9

            # Health and metadata calls have slots of their own.
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="m"), timeout=10)
            assert meta.inputs[0].shape == [-1, 4]

            # A cancelled call gives its slot back: one more call gets in.
            held[0].cancel()
            await _until(lambda: held[0].done())
            later = asyncio.ensure_future(stub.ModelInfer(request_for("m", 0, x), timeout=30))
            await _until(lambda: router.entered == SLOTS + 1)

            router.release.set()
            for call in [*held[1:], later]:
                torch.testing.assert_close(tensor_from_response(await call), x * 2)
            # All slots back: a full set of calls is served again.
            answers = await asyncio.gather(*(stub.ModelInfer(request_for("m", 0, x), timeout=30)
                                             for _ in range(SLOTS)))
            for a in answers:
                torch.testing.assert_close(tensor_from_response(a), x * 2)
    finally:
        await server.stop(None)


def test_calls_over_the_limit_are_refused_on_arrival_and_slots_come_back() -> None:
    asyncio.run(_scenario())


class _Stuck(FakeRouter):
    """A router that never answers; it records when the server gives up on a call."""

    def __init__(self):
        self.entered = 0
        self.abandoned_after_s: list[float] = []

    async def submit(self, model, layer, x):
        self.entered += 1
        t0 = time.monotonic()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.abandoned_after_s.append(time.monotonic() - t0)
            raise
        raise AssertionError("unreachable")


def test_the_server_abandons_a_call_when_its_deadline_passes_and_frees_its_slot() -> None:
    # The deadline (0.5 s) is long enough to reach the router, so what ends the work is the
    # server: a server that ignored deadlines would leave the router's call running.
    async def main():
        router = _Stuck()
        server, address = await _serve(router)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(SLOTS + 1):  # more calls than slots: each one's slot came back
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.ModelInfer(request_for("m", 0, torch.randn(2, 4)), timeout=0.5)
                    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    await _until(lambda: len(router.abandoned_after_s) == router.entered)
                assert router.entered == SLOTS + 1
                assert all(0.2 < s < 5.0 for s in router.abandoned_after_s), router.abandoned_after_s
        finally:
            await server.stop(None)

    asyncio.run(main())
