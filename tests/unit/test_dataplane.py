"""The host data plane without Ray: its codec, its server (started in-process on 127.0.0.1)
against `ExpertHost.run`, the secret it demands, and the router's gRPC transport, whose call
to a dead server raises HostGone like a dead Ray actor does."""

from __future__ import annotations

import asyncio
import ctypes
import secrets
import time

import grpc
import pytest
import torch

from moefleet.core.errors import HostGone, Unavailable
from moefleet.experts.dataplane import (
    RUN_METHOD,
    SECRET_KEY,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    serve,
)
from moefleet.experts.host import ExpertHost, from_wire, to_wire
from moefleet.experts.weights import RandomSource
from moefleet.router.dispatch import HostBatch
from moefleet.router.transport import HostLink, Transport

pytestmark = pytest.mark.unit

H, SLOTS = 32, 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_request_and_reply_round_trip_bit_exact(dtype, rows):
    x = torch.randn(rows, H).to(dtype)
    slot_ids, counts = torch.tensor([3, 0]), torch.tensor([rows - rows // 2, rows // 2])
    got, got_slots, got_counts = decode_request(encode_request(x, slot_ids, counts))
    assert torch.equal(got, x) and got.dtype == dtype
    assert (got_slots, got_counts) == ([3, 0], [rows - rows // 2, rows // 2])
    assert torch.equal(decode_reply(encode_reply(x), dtype, (rows, H)), x)


def test_decoded_rows_share_the_message_memory():
    data = encode_request(torch.arange(8.0).reshape(2, 4), torch.tensor([0]), torch.tensor([2]))
    x, _, _ = decode_request(data)
    assert x.untyped_storage().data_ptr() - _address_of(data) == len(data) - x.nbytes


@pytest.mark.parametrize("cut", [3, 1])
def test_malformed_requests_are_refused(cut):
    data = encode_request(torch.ones(2, 4), torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(ValueError):
        decode_request(data[:cut] if cut == 3 else data[:-cut])


# ---- server -------------------------------------------------------------------------------

@pytest.fixture
def served():
    src = RandomSource(seed=3, hidden_size=H, intermediate_size=16, n_routed_experts=SLOTS)
    host = ExpertHost("h", SLOTS, 1)
    for slot in range(SLOTS):
        host.load_weights(slot=slot, layer=0, expert=slot, weights=src.expert(0, slot))
    secret = secrets.token_urlsafe(16)
    server, address = serve(host.compute, "127.0.0.1", secret)
    yield host, address, secret, server
    server.stop(0)


def _call(address: str, data: bytes, metadata=()) -> bytes:
    with grpc.insecure_channel(address) as ch:
        return ch.unary_unary(RUN_METHOD)(data, metadata=metadata, timeout=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_server_answers_what_the_host_computes(served, dtype):
    host, address, secret, _ = served
    x = torch.randn(9, H).to(dtype)
    slot_ids, counts = [2, 0, 3], [4, 1, 4]
    data = _call(address, encode_request(x, torch.tensor(slot_ids), torch.tensor(counts)),
                 ((SECRET_KEY, secret),))
    arr, wire_dtype = to_wire(x)
    want = from_wire(*host.run(x=arr, dtype=wire_dtype, slot_ids=slot_ids, counts=counts))
    torch.testing.assert_close(decode_reply(data, dtype, (9, H)), want)


@pytest.mark.parametrize("metadata", [(), ((SECRET_KEY, "wrong"),), (("other", "x"),)])
def test_call_without_the_secret_is_unauthenticated_and_server_still_answers(served, metadata):
    _, address, secret, _ = served
    data = encode_request(torch.randn(2, H), torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(grpc.RpcError) as e:
        _call(address, data, metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(_call(address, data, ((SECRET_KEY, secret),))) == 2 * H * 4


def test_bad_request_and_empty_slot_get_clear_statuses(served):
    host, address, secret, _ = served
    auth = ((SECRET_KEY, secret),)
    with pytest.raises(grpc.RpcError) as e:
        _call(address, b"garbage", auth)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    host.free(slot=1)
    with pytest.raises(grpc.RpcError) as e:
        _call(address, encode_request(torch.randn(2, H), torch.tensor([1]), torch.tensor([2])), auth)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# ---- the router's transport -----------------------------------------------------------------

def _batch(slot_ids: list[int], counts: list[int]) -> HostBatch:
    return HostBatch(0, 0, sum(counts), torch.tensor(slot_ids), torch.tensor(counts))


def test_grpc_transport_matches_the_host_then_raises_host_gone_once_it_is_dead(served):
    host, address, secret, server = served
    x = torch.randn(6, H)
    b = _batch([1, 2], [2, 4])
    link = HostLink(None, address, secret)  # no Ray handle: this must go over gRPC

    async def go():
        t = Transport("grpc")
        try:
            y = await t(link, x, b)
            server.stop(0).wait()
            with pytest.raises(HostGone):
                await t(link, x, b)
            return y
        finally:
            await t.close()

    y = asyncio.run(go())
    arr, dtype = to_wire(x)
    torch.testing.assert_close(y, from_wire(*host.run(x=arr, dtype=dtype, slot_ids=[1, 2], counts=[2, 4])))


def test_grpc_transport_with_a_wrong_secret_is_unavailable_not_host_gone(served):
    _, address, _, _ = served

    async def go():
        t = Transport("auto", grpc_max_bytes=1 << 20)
        try:
            await t(HostLink(None, address, "wrong"), torch.randn(2, H), _batch([0], [2]))
        finally:
            await t.close()

    with pytest.raises(Unavailable, match="UNAUTHENTICATED"):
        asyncio.run(go())


def test_a_call_in_flight_on_a_dropped_hosts_channel_still_completes():
    server, address = serve(lambda x, _s, _c: (time.sleep(0.3), x)[1], "127.0.0.1", "s")  # slow echo
    link, x = HostLink(None, address, "s"), torch.randn(3, H)

    async def go():
        t = Transport("grpc")
        try:
            call = asyncio.ensure_future(t(link, x, _batch([0], [3])))
            await asyncio.sleep(0.1)
            t.keep([])  # a new version no longer lists this host: its channel closes with grace
            first = await call
            return first, await t(link, x, _batch([0], [3]))  # a new channel if called again
        finally:
            await t.close()

    try:
        first, again = asyncio.run(go())
    finally:
        server.stop(0)
    assert torch.equal(first, x) and torch.equal(again, x)


@pytest.mark.parametrize(("mode", "rows", "address", "want"), [
    ("auto", 8, "h:1", True), ("auto", 9, "h:1", False), ("grpc", 10_000, "h:1", True),
    ("ray", 1, "h:1", False), ("grpc", 1, "", False),
])
def test_transport_picks_grpc_by_mode_size_and_address(mode, rows, address, want):
    t = Transport(mode, grpc_max_bytes=8 * H * 4)  # 8 fp32 rows
    assert t._use_grpc(HostLink(None, address, "s"), torch.zeros(rows, H)) is want


def _address_of(data: bytes) -> int:
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value  # bytes' own buffer
