"""router/server.py's Intake: the gRPC server on a loop of its own refuses calls at the door while the
router's own loop is blocked, serves admitted calls through `OnLoop` on the router's loop, and
ends its thread when stopped; `on_tick` runs on its thread while it listens.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch

from moefleet.protos import inference_pb2 as pb
from moefleet.protos import inference_pb2_grpc as pb_grpc
from moefleet.protos.oip import request_for, tensor_from_response
from moefleet.router.server import InferenceServicer, Intake, OnLoop, ServerLimits
from tests.fake_router import FakeRouter

pytestmark = pytest.mark.unit

SLOTS = 2
BLOCK_S = 2.0  # how long the router's loop is blocked; refusals must come well within it


class _Held(FakeRouter):
    """A router whose calls wait for `release`, on the loop that runs the test."""

    def __init__(self):
        self.release = asyncio.Event()
        self.entered = 0
        self.loop_thread = threading.get_ident()

    async def submit(self, model, layer, x):
        assert threading.get_ident() == self.loop_thread, "submit ran off the router's loop"
        self.entered += 1
        await self.release.wait()
        return x + 1, 3


def _five_calls(address: str, x: torch.Tensor, out: list) -> None:
    """From a thread: five calls, one after another; (status, when it came back) each."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(5):
            try:
                stub.ModelInfer(request_for("m", 0, x), timeout=30)
                out.append((grpc.StatusCode.OK, time.monotonic()))
            except grpc.RpcError as e:
                out.append((e.code(), time.monotonic()))


async def _scenario() -> None:
    router = _Held()
    intake = Intake()
    limits = ServerLimits(max_receive_bytes=1 << 20, max_send_bytes=1 << 20, max_concurrent_rpcs=SLOTS)
    servicers = [(pb_grpc.add_GRPCInferenceServiceServicer_to_server,
                  InferenceServicer(router, OnLoop(router, asyncio.get_running_loop()).submit, 1024),
                  pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)]
    port = await intake.start(servicers, "127.0.0.1", 0, limits)
    thread = intake._thread
    address = f"127.0.0.1:{port}"
    x = torch.randn(3, 4)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        held = [asyncio.ensure_future(stub.ModelInfer(request_for("m", 0, x), timeout=30))
                for _ in range(SLOTS)]
        while router.entered < SLOTS:
            await asyncio.sleep(0.01)

        got: list = []
        caller = threading.Thread(target=_five_calls, args=(address, x, got))
        caller.start()
        time.sleep(BLOCK_S)  # the router's loop is blocked: only the intake's loop runs
        unblocked = time.monotonic()
        await asyncio.to_thread(caller.join, 30)
        assert [code for code, _ in got] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
        assert all(when < unblocked for _, when in got), "a refusal waited for the router's loop"

        router.release.set()
        for call in held:
            torch.testing.assert_close(tensor_from_response(await call), x + 1)
    await intake.stop(1.0)
    assert not thread.is_alive()


def test_the_door_refuses_while_the_router_loop_is_blocked_and_admitted_calls_run_on_it() -> None:
    asyncio.run(_scenario())


async def _ticking() -> None:
    intake, ticks = Intake(), []
    limits = ServerLimits(max_receive_bytes=1 << 20, max_send_bytes=1 << 20, max_concurrent_rpcs=SLOTS)
    await intake.start([], "127.0.0.1", 0, limits, on_tick=lambda: ticks.append(threading.get_ident()))
    thread = intake._thread
    while len(ticks) < 3:
        await asyncio.sleep(0.02)
    await intake.stop(0.5)
    assert set(ticks) == {thread.ident}, "on_tick ran off the intake's thread"
    seen = len(ticks)
    await asyncio.sleep(0.2)
    assert len(ticks) == seen, "on_tick ran after stop"


def test_on_tick_runs_on_the_intake_thread_while_it_listens_and_not_after() -> None:
    asyncio.run(asyncio.wait_for(_ticking(), 10))


async def _ticking_past_a_failure() -> None:
    intake, ticks = Intake(), []

    def tick() -> None:
        ticks.append(1)
        if len(ticks) == 1:
            raise RuntimeError("a tick that fails once")

    limits = ServerLimits(max_receive_bytes=1 << 20, max_send_bytes=1 << 20, max_concurrent_rpcs=SLOTS)
    await intake.start([], "127.0.0.1", 0, limits, on_tick=tick)
    while len(ticks) < 3:
        await asyncio.sleep(0.02)
    await intake.stop(0.5)


def test_a_tick_that_raises_does_not_stop_the_ticks() -> None:
    asyncio.run(asyncio.wait_for(_ticking_past_a_failure(), 10))
