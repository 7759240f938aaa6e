"""The Python client against routers that stop and come back: it retries UNAVAILABLE with
backoff within the call's deadline, reconnects soon to a router that listens again, and moves
to another router of those its address lists (plain gRPC servers on 127.0.0.1 stand in for
routers, ServerReady only). An overload refusal carries gRPC's retry pushback, which the
client honours (the real servicer and interceptor over a router that refuses)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest
import torch

from moefleet.client import Client
from moefleet.client.client import _target
from moefleet.core.errors import Overloaded, ResourceExhausted
from moefleet.protos import inference_pb2 as pb
from moefleet.protos import inference_pb2_grpc as pb_grpc
from moefleet.router.server import InferenceServicer, ServerLimits, serve_grpc
from tests.fake_router import FakeRouter

pytestmark = pytest.mark.unit


class _Ready(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self):
        self.calls = 0

    def ServerReady(self, request, context):
        self.calls += 1
        return pb.ServerReadyResponse(ready=True)


def _router(port: int = 0) -> tuple[grpc.Server, int, _Ready]:
    servicer = _Ready()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound, servicer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_call_waits_out_a_router_restart_within_its_deadline() -> None:
    port = _free_port()
    started: list[grpc.Server] = []
    later = threading.Timer(0.8, lambda: started.append(_router(port)[0]))
    with Client(f"127.0.0.1:{port}") as c:
        later.start()
        try:
            t0 = time.monotonic()
            assert c.ready(timeout_s=5.0)
            assert 0.7 < time.monotonic() - t0 < 3.0, "answered soon after the router came back"
        finally:
            later.join()
            for s in started:
                s.stop(0)


def test_a_call_to_no_router_fails_unavailable_by_its_deadline_never_hangs() -> None:
    with Client(f"127.0.0.1:{_free_port()}") as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.status(timeout_s=0.6)
        assert time.monotonic() - t0 < 1.5
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    with Client(f"127.0.0.1:{_free_port()}", retries=0) as c, pytest.raises(grpc.RpcError) as err:
        c.status(timeout_s=5.0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_of_two_routers_moves_to_the_other_when_one_stops() -> None:
    (a, pa, ra), (b, pb_, rb) = _router(), _router()
    try:
        with Client(f"127.0.0.1:{pa},127.0.0.1:{pb_}") as c:
            for _ in range(20):
                assert c.ready(timeout_s=5.0)
            assert ra.calls > 0 and rb.calls > 0, "calls are spread over both"
            a.stop(0).wait()
            before = rb.calls
            for _ in range(20):
                assert c.ready(timeout_s=5.0)
            assert rb.calls == before + 20
    finally:
        a.stop(0)
        b.stop(0)


def test_target_lists_ipv4_routers_and_refuses_a_list_of_names() -> None:
    assert _target("10.0.0.1:50051") == "10.0.0.1:50051"
    assert _target("localhost:50051") == "localhost:50051"
    assert _target("dns:///routers.example:50051") == "dns:///routers.example:50051"
    assert _target("10.0.0.1:1, 10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    with pytest.raises(ValueError, match="dns:///"):
        _target("a.example:1,b.example:2")


# ---- overload refusals ------------------------------------------------------------------


class _Refusing(FakeRouter):
    """What the servicer delegates to: refuses the first `refusals` calls as overloaded (or, with
    `for_good`, as too large), then answers x + 1."""

    def __init__(self, refusals: int, for_good: bool = False):
        self.refusals, self.for_good, self.calls = refusals, for_good, 0

    async def submit(self, model, layer, x):
        self.calls += 1
        if self.calls <= self.refusals:
            if self.for_good:
                raise ResourceExhausted("too many tokens")
            raise Overloaded("router is overloaded; retry later", retry_after_s=0.2)
        return x + 1, 7


@contextmanager
def _serving(router) -> Iterator[str]:
    """The real servicer and error interceptor over `router`, on a loop of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    limits = ServerLimits(max_receive_bytes=1 << 20, max_send_bytes=1 << 20, max_concurrent_rpcs=8)
    servicers = [(pb_grpc.add_GRPCInferenceServiceServicer_to_server,
                  InferenceServicer(router, router.submit, 64),
                  pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)]
    server, port, _ = asyncio.run_coroutine_threadsafe(
        serve_grpc(servicers, "127.0.0.1", 0, limits), loop).result(10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_an_overload_refusal_carries_a_pushback_and_the_client_retries_after_it() -> None:
    router = _Refusing(refusals=2)
    x = torch.randn(3, 4)
    with _serving(router) as address, Client(address) as c:
        t0 = time.monotonic()
        y, version = c.infer_with_version("m", 0, x, timeout_s=10)
        waited = time.monotonic() - t0
        torch.testing.assert_close(y, x + 1)
        assert version == 7 and router.calls == 3
        assert 0.4 <= waited < 3.0, "it waited the 200 ms pushback twice"
        with Client(address, retries=0) as raw, pytest.raises(grpc.RpcError) as err:
            router.calls = 0
            raw.infer("m", 0, x)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"] == "200"


def test_a_refusal_without_pushback_is_not_retried() -> None:
    router = _Refusing(refusals=1, for_good=True)
    with _serving(router) as address, Client(address) as c, pytest.raises(grpc.RpcError) as err:
        c.infer("m", 0, torch.randn(3, 4), timeout_s=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and router.calls == 1
