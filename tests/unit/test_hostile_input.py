"""Hostile input against the real gRPC server, in process: every malformed message gets a clean
status (never UNKNOWN or INTERNAL), no status echoes a long client string, and the service
answers a good request correctly afterwards.

The server is `serve_grpc` with the real `InferenceServicer` and `ErrorInterceptor`, in front
of a real `Engine` + `MicroBatcher` whose hosts are in-process `ExpertHost`s; only Ray is left
out. Requests go as raw bytes, so undecodable messages reach the server as a hostile client
would send them.

# T = tokens, H = hidden
"""

from __future__ import annotations

import asyncio
import random
import struct

import grpc
import pytest
import torch

from moefleet.core.config import MoEConfig
from moefleet.experts.host import ExpertHost, from_wire, to_wire
from moefleet.experts.reference import MoELayer
from moefleet.experts.weights import RandomSource
from moefleet.protos import inference_pb2 as pb
from moefleet.protos import inference_pb2_grpc as pb_grpc
from moefleet.protos.oip import request_for, tensor_from_response
from moefleet.router.batcher import MicroBatcher
from moefleet.router.dispatch import LayerTable
from moefleet.router.engine import Engine, LayerState, ModelState
from moefleet.router.gating import Gate, route
from moefleet.router.server import InferenceServicer, ServerLimits, serve_grpc

pytestmark = pytest.mark.unit

H, INTER, E, LAYER, MODEL = 32, 24, 8, 0, "m"
MAX_TOKENS = 64
CFG = MoEConfig(hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=E, num_experts_per_tok=2)
CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.RESOURCE_EXHAUSTED}
MAX_DETAILS = 2100  # the interceptor cuts statuses at 2000 characters
INFER = "/inference.GRPCInferenceService/ModelInfer"


class _LocalRouter:
    """What the servicer delegates to, as the Router actor does it, minus Ray."""

    def __init__(self):
        src = RandomSource(seed=0, hidden_size=H, intermediate_size=INTER, n_routed_experts=E)
        host = ExpertHost("h0", E, num_cpus=1, device="cpu")
        for e in range(E):
            host.load_weights(slot=e, layer=LAYER, expert=e, weights=src.expert(LAYER, e))
        gw = src.gate(LAYER)
        self.gate = Gate(gw.weight, torch.arange(E), torch.zeros(E, dtype=torch.long), gw.bias)
        self.reference = MoELayer({e: src.expert(LAYER, e) for e in range(E)}, None)
        table = LayerTable.from_replicas({e: [(0, e)] for e in range(E)})
        state = ModelState(MODEL, CFG, torch.float32, 1, {LAYER: LayerState(self.gate, table)},
                           [host], ["h0"])
        self.engine = Engine(_call_host, "cpu")
        self.engine.install(state)
        self.batcher = MicroBatcher(self.engine, 256, 0.001, 4096, 0.05)
        self.submit = self.batcher.submit

    def ready(self):
        return True

    def model_names(self):
        return self.engine.model_names()

    def metadata(self, model):
        st = self.engine.state(model)
        return st.cfg.hidden_size, st.dtype

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference(x, *route(x, self.gate, CFG))


async def _call_host(host, x, b):
    arr, dtype = to_wire(x)
    y, y_dtype = host.run(x=arr, dtype=dtype, slot_ids=b.slot_ids.tolist(), counts=b.counts.tolist())
    return from_wire(y, y_dtype)


def _good(t: int = 3, seed: int = 0) -> tuple[pb.ModelInferRequest, torch.Tensor]:
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(seed))
    return request_for(MODEL, LAYER, x), x


# ---- malformed requests, each with the one status it must get -------------------------------


def _structured(rng: random.Random) -> tuple[bytes, set[grpc.StatusCode]]:
    """A decodable request that breaks one rule, and the statuses it may get."""
    req, _ = _good(rng.randint(1, 4), rng.randint(0, 10**6))
    long = "x" * rng.choice([300, 20_000, 70_000])
    bad = grpc.StatusCode.INVALID_ARGUMENT
    kind = rng.randrange(14)
    if kind == 0:
        req.model_name = long
        want = grpc.StatusCode.NOT_FOUND
    elif kind == 1:
        req.inputs[0].name = long
        want = bad
    elif kind == 2:
        req.inputs[0].datatype = rng.choice([long, "INT64", "FP64", "", "fp32"])
        want = bad
    elif kind == 3:
        req.outputs.add(name=rng.choice(["foo", long, ""]))
        want = bad
    elif kind == 4:
        req.model_version = rng.choice(["999", "0", long])
        want = grpc.StatusCode.NOT_FOUND
    elif kind == 5:  # FP32 data in both typed fields
        x = torch.randn(1, H)
        del req.raw_input_contents[:]
        req.inputs[0].shape[:] = [1, H]
        req.inputs[0].contents.fp32_contents.extend(x.flatten().tolist())
        req.inputs[0].contents.int64_contents.extend([rng.randint(-5, 5)])
        want = bad
    elif kind == 6:
        req.inputs[0].shape[:] = rng.choice([[H], [1, 2, H], [-1, H], [1, H + 1], [2, 2**62]])
        want = bad
    elif kind == 7:
        req.raw_input_contents[0] = req.raw_input_contents[0][: rng.randrange(len(req.raw_input_contents[0]))]
        want = bad
    elif kind == 8:
        req.parameters["layer"].string_param = "0"
        want = bad
    elif kind == 9:
        del req.parameters["layer"]
        want = bad
    elif kind == 10:
        req.parameters["layer"].int64_param = rng.choice([1, -1, 2**62])
        want = grpc.StatusCode.NOT_FOUND
    elif kind == 11:  # over the token limit: refused from the declared shape alone
        t = MAX_TOKENS + rng.randint(1, 10**6)
        req.inputs[0].shape[:] = [t, H]
        want = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif kind == 12:
        req.inputs.add(name="hidden_states", datatype="FP32", shape=[1, H])
        want = bad
    else:  # a hidden size the model does not have, with matching bytes
        req.inputs[0].shape[:] = [1, H * 2]
        req.raw_input_contents[0] = bytes(8 * H)
        want = bad
    return req.SerializeToString(), {want}


def _undecodable(rng: random.Random) -> tuple[bytes, set[grpc.StatusCode]]:
    """Bytes that are no ModelInferRequest: random, a bad wire type, a length past the end."""
    kind = rng.randrange(3)
    if kind == 0:
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        return data, CLEAN | {grpc.StatusCode.OK}  # random bytes may parse as a message
    if kind == 1:
        return b"\xff\xff", {grpc.StatusCode.INVALID_ARGUMENT}
    # field 1 (model_name), length-delimited, claiming more bytes than follow
    return b"\x0a" + _varint(rng.randint(100, 10**6)) + b"abc", {grpc.StatusCode.INVALID_ARGUMENT}


def _bit_flipped(rng: random.Random) -> tuple[bytes, set[grpc.StatusCode]]:
    data = bytearray(_good(2, rng.randint(0, 10**6))[0].SerializeToString())
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data), CLEAN | {grpc.StatusCode.OK}  # a flip inside the tensor bytes is valid


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out += struct.pack("B", (n & 0x7F) | 0x80)
        n >>= 7
    return out + struct.pack("B", n)


# ---- the test ---------------------------------------------------------------------------------


async def _serve(router: _LocalRouter):
    servicer = InferenceServicer(router, router.submit, MAX_TOKENS)
    add = pb_grpc.add_GRPCInferenceServiceServicer_to_server
    limits = ServerLimits(max_receive_bytes=1 << 20, max_send_bytes=1 << 20, max_concurrent_rpcs=256)
    name = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    server, port, _ = await serve_grpc([(add, servicer, name)], "127.0.0.1", 0, limits)
    return server, port


async def _send(call, data: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        await call(data, timeout=30)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def _fuzz(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    router = _LocalRouter()
    server, port = await _serve(router)
    problems: list[str] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(INFER)  # bytes in, bytes out
            makers = [_structured] * 6 + [_undecodable] * 2 + [_bit_flipped] * 2
            cases = [rng.choice(makers)(rng) for _ in range(n)]
            for i in range(0, n, 250):
                chunk = cases[i:i + 250]
                got = await asyncio.gather(*(_send(call, data) for data, _ in chunk))
                for (data, allowed), (code, details) in zip(chunk, got, strict=True):
                    if code not in allowed or len(details) > MAX_DETAILS or "x" * 300 in details:
                        problems.append(f"{code.name} ({len(details)} chars) for {data[:40]!r}: "
                                        f"{details[:200]}")
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            req, x = _good(5, seed)
            y = tensor_from_response(await stub.ModelInfer(req, timeout=30))
            torch.testing.assert_close(y, router.expected(x), rtol=1e-5, atol=1e-5)
            garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata")
            code, _ = await _send(garbage, b"\xff\xff\xff")
            if code != grpc.StatusCode.INVALID_ARGUMENT:
                problems.append(f"ModelMetadata of garbage: {code.name}")
    finally:
        await server.stop(None)
    return problems


@pytest.mark.slow  # about 15 s on two busy cores
def test_ten_thousand_malformed_requests_get_clean_statuses_and_the_service_still_answers() -> None:
    torch.set_num_threads(1)
    problems = asyncio.run(_fuzz(10_000, seed=7))
    assert not problems, f"{len(problems)} unclean answers, e.g. {problems[:5]}"
