"""The door's overload control (`router.admission`: a cap on admitted calls while the CPU is
saturated), on a fake clock and a fake CPU reading; last, through the real gRPC door."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
import torch

from moefleet.core.errors import Overloaded
from moefleet.protos import inference_pb2 as pb
from moefleet.protos import inference_pb2_grpc as pb_grpc
from moefleet.protos.oip import request_for, tensor_from_response
from moefleet.router.admission import Admission, AdmissionPolicy, CpuIdle, ProcessCpu
from moefleet.router.server import InferenceServicer, ServerLimits, serve_grpc
from tests.fake_router import FakeRouter

pytestmark = pytest.mark.unit

TICK_S = 0.05  # as the intake ticks


class World:
    """Calls arriving evenly, a queue that refuses a share of them, and a CPU reading."""

    def __init__(self, policy: AdmissionPolicy | None = None):
        self.now = 0.0
        self.idle = 0.5
        self.busy = 0.9  # cores the router uses
        self.queue_refuses = 0.0  # share of calls the queue's own check refuses
        self.slots_refuse = 0.0  # share of calls the door refuses for want of a slot, before both
        self._debt = self._slot_debt = 0.0
        self.admission = Admission(self._check, policy or AdmissionPolicy(min_idle=0.08),
                                   idle=lambda: self.idle, busy=lambda: self.busy,
                                   clock=lambda: self.now)

    def _check(self, open_calls: int) -> Overloaded | None:
        self._debt += self.queue_refuses
        if self._debt >= 1.0:
            self._debt -= 1.0
            return Overloaded("queue full", 0.05)
        return None

    def run(self, seconds: float, calls_per_s: float) -> tuple[int, int]:
        """(admitted, refused) over `seconds` of calls at `calls_per_s`, ticking as the intake does."""
        admitted = refused = 0
        per_tick = calls_per_s * TICK_S
        owed = 0.0
        for _ in range(round(seconds / TICK_S)):
            start, owed = self.now, owed + per_tick
            n = int(owed)
            owed -= n
            for i in range(n):
                self.now = start + i * TICK_S / n
                self._slot_debt += self.slots_refuse
                if self._slot_debt >= 1.0:
                    self._slot_debt -= 1.0
                    self.admission.refused_elsewhere()
                    refused += 1
                elif self.admission.refusal() is None:
                    admitted += 1
                else:
                    refused += 1
            self.now = start + TICK_S
            self.admission.tick()
        return admitted, refused


def _engaged(overload_s: float = 0.5) -> World:
    """80 calls/s served for 10 s, then 800/s offered, 90 % refused by the queue, no CPU idle."""
    w = World()
    w.run(10.0, 80)
    w.idle, w.queue_refuses = 0.02, 0.9
    w.run(overload_s, 800)
    return w


def test_no_cap_without_refusals_even_on_a_saturated_cpu():
    w = World()
    w.idle = 0.0
    admitted, refused = w.run(5.0, 80)
    assert (admitted, refused) == (400, 0)
    assert not w.admission.engaged


def test_a_closed_loop_whose_queue_refuses_a_few_calls_is_not_capped():
    w = World()
    w.run(5.0, 80)
    w.idle, w.queue_refuses = 0.02, 0.2  # a fifth refused: not overloaded
    w.run(5.0, 100)
    assert not w.admission.engaged


def test_overload_on_a_saturated_cpu_caps_at_the_floor_of_the_rate_served_before():
    w = World()
    w.run(10.0, 80)  # served 80/s
    served = w.admission.served_per_s
    assert served == pytest.approx(80, rel=0.15)
    w.idle, w.queue_refuses = 0.02, 0.9
    w.run(0.5, 800)
    assert w.admission.engaged
    assert w.admission.cap == pytest.approx(w.admission.policy.floor * served)
    admitted, refused = w.run(4.0, 800)
    # the cap and the queue's own check both refuse; at most the cap's rate gets through
    assert admitted <= 4.0 * w.admission.cap + w.admission.policy.burst_s * w.admission.cap + 1
    assert refused > 10 * admitted


def test_the_cap_engages_within_a_tenth_of_a_second_of_the_router_saturating():
    # The cap's onset sets the refusal p99 at 10x (bench/RESULTS.md): engaged 0.25 s in,
    # refusals' p99 was 0.2-0.6 s; 0.5 s in, 0.7-1.8 s. The router's cores go from 0.3 to 0.9.
    w = World()
    w.busy = 0.3
    w.run(10.0, 80)
    w.idle, w.queue_refuses, w.busy = 0.02, 0.9, 0.9
    w.run(0.1, 800)
    assert w.admission.engaged


def test_calls_refused_for_want_of_a_slot_count_towards_the_overload():
    # The queue refuses nothing (every slot is taken before it is asked): the door's slot
    # refusals alone must engage the cap, as soon as the queue's would.
    w = World()
    w.run(10.0, 80)
    w.idle, w.slots_refuse = 0.02, 0.9
    w.run(0.25, 800)
    assert w.admission.engaged


def test_overload_with_idle_cpu_is_left_to_the_queue():
    w = World()
    w.run(5.0, 80)
    w.queue_refuses = 0.9
    w.run(5.0, 800)
    assert not w.admission.engaged


def test_the_cap_grows_while_cpu_is_spare_and_falls_by_decrease_when_it_is_not():
    w = _engaged()
    floor = w.admission.cap
    w.idle = 0.5  # the cap freed CPU
    w.run(5.0, 800)
    grown = w.admission.cap
    assert grown == pytest.approx(floor * (1 + 0.3 * TICK_S) ** 100, rel=0.05)
    w.idle = 0.02
    w.run(0.3, 800)  # the smoothed idle share falls under min_idle: one decrease
    assert w.admission.cap == pytest.approx(grown * 0.4, rel=0.05)
    w.run(1.0, 800)  # still no idle CPU: down to the floor, never below it
    assert w.admission.cap == pytest.approx(floor)


def test_the_cap_does_not_grow_while_something_else_refuses():
    w = _engaged()
    w.idle, w.queue_refuses = 0.5, 0.99  # the queue lets through 8/s: under the cap, so it binds not
    w.run(0.5, 800)  # the bucket refills
    cap = w.admission.cap
    w.run(2.0, 800)
    assert w.admission.engaged and w.admission.cap == pytest.approx(cap)


def test_overload_on_a_cpu_the_router_does_not_saturate_is_left_to_the_queue():
    w = World()  # the experts, not the router, use the CPU
    w.busy = 0.45
    w.run(10.0, 80)
    w.idle, w.queue_refuses = 0.0, 0.9
    w.run(5.0, 800)
    assert not w.admission.engaged


def test_few_refusals_a_second_do_not_engage_the_cap_whatever_their_share():
    # 8 callers that wait out the pushback, where large experts saturate the CPU (I=2048 in
    # bench/overload.py): the queue refuses five calls for each it serves, but only 75 a second.
    w = World()
    w.run(10.0, 15)
    w.idle, w.queue_refuses = 0.0, 5 / 6
    w.run(5.0, 90)
    assert not w.admission.engaged


def test_once_engaged_the_cap_holds_while_it_still_refuses_more_than_50_a_second():
    # 3x: the cap grows until it admits about a fifth of the calls, refusing under the 200 a
    # second that engaged it; lifting it there would let the backlog back in.
    w = _engaged()
    w.idle, w.queue_refuses = 0.5, 0.0
    w.run(5.0, 240)  # grown to about 45 calls/s
    assert 30 < w.admission.cap < 60
    w.idle = 0.15  # under spare_idle: it holds, refusing about 200 a second
    w.run(4.0, 240)
    assert w.admission.engaged and 150 < w.admission.refused_per_s < 200


def test_the_cap_is_lifted_once_the_overload_has_been_gone_for_quiet_s():
    w = _engaged(1.0)
    assert w.admission.engaged
    w.queue_refuses = 0.0
    w.run(1.0, 5)  # the cap admits all of these: not overloaded any more
    assert w.admission.engaged
    w.run(2.0, 5)
    assert not w.admission.engaged
    assert w.run(1.0, 80) == (80, 0)


def test_a_refusal_by_the_cap_says_when_to_retry_and_quotes_nothing_from_the_caller():
    w = _engaged(1.0)
    w.queue_refuses = 0.0
    before = w.admission.refused_by_cap
    refusals = [r for r in (w.admission.refusal() for _ in range(50)) if r is not None]
    assert refusals, "a burst of 50 calls at one instant must overflow the bucket"
    r = refusals[-1]
    assert isinstance(r, Overloaded)
    assert r.retry_after_s == pytest.approx(1.0 / w.admission.cap)
    assert "calls/s" in str(r) and len(str(r)) < 200
    assert w.admission.refused_by_cap - before == len(refusals)


def test_a_cpu_reading_that_is_missing_or_not_finite_leaves_the_idle_share_alone():
    w = World()
    w.run(1.0, 10)
    before = w.admission.idle
    busy = w.admission.busy
    for bad in (None, math.nan, math.inf):
        w.idle = w.busy = bad
        w.run(0.5, 10)
        assert w.admission.idle == pytest.approx(before) and w.admission.busy == pytest.approx(busy)


def test_process_cpu_counts_the_cores_this_process_used():
    now = [0.0]
    cores = ProcessCpu(clock=lambda: now[0])
    assert cores() is None  # no time passed
    now[0] = 0.05
    end = time.process_time() + 0.02
    while time.process_time() < end:  # burn 20 ms of CPU in 50 ms of fake wall time
        pass
    assert 0.4 <= cores() <= 2.0


def test_cpu_idle_reads_the_idle_and_iowait_share_between_two_calls(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4 5\n")
    idle = CpuIdle(str(stat))
    assert idle() is None  # no time passed
    stat.write_text("cpu  150 0 150 750 150 0 0 0 0 0\n")
    assert idle() == pytest.approx(100 / 200)
    assert CpuIdle(str(tmp_path / "missing"))() is None
    stat.write_text("cpu  garbage\n")
    assert CpuIdle(str(stat))() is None


class _Doubler(FakeRouter):
    async def submit(self, model, layer, x):
        return x * 2, 1


async def _through_the_door() -> None:
    w = _engaged(1.0)
    w.queue_refuses = 0.0  # from here only the cap refuses; the fake clock stands still
    limits = ServerLimits(max_receive_bytes=1 << 20, max_send_bytes=1 << 20, max_concurrent_rpcs=8)
    doubler = _Doubler()
    servicers = [(pb_grpc.add_GRPCInferenceServiceServicer_to_server,
                  InferenceServicer(doubler, doubler.submit, 1024),
                  pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)]
    server, port, _ = await serve_grpc(servicers, "127.0.0.1", 0, limits,
                                       infer_refusal=w.admission.refusal)
    x = torch.randn(3, 4)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(request_for("m", 0, x), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "calls/s" in refused.value.details()
            pushback = dict(refused.value.trailing_metadata())["grpc-retry-pushback-ms"]
            assert pushback == str(math.ceil(1e3 / w.admission.cap))
            w.now += 1.0  # a second later the bucket holds a call again
            y = tensor_from_response(await stub.ModelInfer(request_for("m", 0, x), timeout=10))
            torch.testing.assert_close(y, x * 2)
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await stub.ModelInfer(request_for("m", 0, x), timeout=10)
            assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(None)


def test_the_cap_refuses_at_the_grpc_door_with_its_pushback_and_admits_a_call_per_token():
    asyncio.run(asyncio.wait_for(_through_the_door(), 30))
