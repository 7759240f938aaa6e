"""The Python client against routers that stop and come back: it retries UNAVAILABLE with
backoff within the call's deadline, reconnects soon to a router that listens again, and moves
to another router of those its address lists. Plain gRPC servers on 127.0.0.1 stand in for
routers (ServerReady only)."""

from __future__ import annotations

import socket
import threading
import time
from concurrent import futures

import grpc
import pytest

from moefleet.client import Client
from moefleet.client.client import _target
from moefleet.protos import inference_pb2 as pb
from moefleet.protos import inference_pb2_grpc as pb_grpc

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
