"""Overload: far more callers than the service can serve get RESOURCE_EXHAUSTED, never a wrong
answer or another status; the Router's own memory (its RSS less the Ray object store's pages it
has mapped) stays under its documented bound during the load and returns near its idle level
after it; health stays SERVING.

The load is bounded: 48 callers for a few seconds, each pausing briefly after a refusal as a
retrying client would.

# T = tokens per request, H = hidden
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moefleet.cluster import service
from moefleet.protos import inference_pb2 as pb
from moefleet.protos.oip import request_for, tensor_from_response
from moefleet.router.actor import memory_bound
from moefleet.testing import Reference
from tests.specs import family_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INFER = "/inference.GRPCInferenceService/ModelInfer"
LIMITS = {"max_request_tokens": 1024, "max_queue_tokens": 8192, "max_concurrent_rpcs": 32,
          "max_batch_tokens": 512, "max_queue_delay_s": 0.02}
MOE = {"hidden_size": 256, "moe_intermediate_size": 1024}  # the experts, not the calls, take the time
CALLERS, SECONDS, T = 48, 6.0, 256
AFTER_SLACK = 128 << 20  # after the load, its own RSS is back within this of idle (target: 256 MiB)


async def _load(address: str, data: list[bytes], want: list[torch.Tensor]) -> dict[str, int]:
    counts: dict[str, int] = {}
    wrong = 0
    end = time.monotonic() + SECONDS

    async def caller(call, c: int) -> None:
        nonlocal wrong
        i = c
        while time.monotonic() < end:
            try:
                raw = await call(data[i % len(data)], timeout=10.0)
            except grpc.aio.AioRpcError as e:
                counts[e.code().name] = counts.get(e.code().name, 0) + 1
                await asyncio.sleep(0.01)
                continue
            counts["OK"] = counts.get("OK", 0) + 1
            y = tensor_from_response(pb.ModelInferResponse.FromString(raw))
            wrong += not torch.allclose(y, want[i % len(want)], rtol=1e-4, atol=1e-4)
            i += CALLERS

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER)
        await asyncio.gather(*(caller(call, c) for c in range(CALLERS)))
        health = health_pb2_grpc.HealthStub(channel)
        status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status
    counts["wrong"] = wrong
    counts["serving"] = int(status == health_pb2.HealthCheckResponse.SERVING)
    return counts


def test_overload_is_refused_cleanly_with_bounded_memory_that_is_given_back(ray_session):
    spec = family_spec("deepseek_v3", router=LIMITS, moe=MOE)
    svc = service.start(spec, port=0, host="127.0.0.1")
    try:
        router = svc.routers[0]
        ref = Reference(spec)
        xs = [torch.randn(T, spec.moe.hidden_size, generator=torch.Generator().manual_seed(i))
              for i in range(4)]
        data = [request_for(spec.name, 1, x).SerializeToString() for x in xs]
        want = [ref(1, x) for x in xs]
        idle = ray.get(router.memory.remote())["own"]
        bound = memory_bound(spec.router, [spec.moe])
        peak = [idle]

        async def sample(stop: asyncio.Event) -> None:
            while not stop.is_set():
                peak.append((await router.memory.remote())["own"])
                await asyncio.sleep(0.2)

        async def run() -> dict[str, int]:
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample(stop))
            counts = await _load(svc.address, data, want)
            stop.set()
            await sampler
            return counts

        counts = asyncio.run(run())
        time.sleep(3.0)  # the router trims its heap once idle
        after = ray.get(router.memory.remote())["own"]
    finally:
        svc.shutdown()
    assert counts.get("RESOURCE_EXHAUSTED", 0) > 0 and counts.get("OK", 0) > 0, counts
    assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED", "wrong", "serving"}, counts
    assert counts["wrong"] == 0 and counts["serving"] == 1, counts
    assert max(peak) <= idle + bound, (max(peak) >> 20, idle >> 20, bound >> 20)
    assert after <= idle + AFTER_SLACK, (after >> 20, idle >> 20)
