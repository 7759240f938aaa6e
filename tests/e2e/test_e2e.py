"""A started `moefleet serve`, called through the Python client and an unchanged tritonclient,
in fp32 and bf16; health checking, reflection, and every error path of the contract — each
error asserted by status code, followed by a valid request that must still be answered right."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moefleet.client import Client
from moefleet.protos import inference_pb2 as pb
from moefleet.protos import inference_pb2_grpc as pb_grpc
from moefleet.protos.oip import request_for

pytestmark = pytest.mark.e2e

BF16 = {"rtol": 1.6e-2, "atol": 1e-2}


def _x(served, tokens: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, served.spec.moe.hidden_size, generator=g).to(dtype)


def _expect(served, x: torch.Tensor, layer: int) -> torch.Tensor:
    return served.reference(layer, x.float()).to(x.dtype)


def _assert_still_serving(served) -> None:
    x = _x(served, 9, seed=99)
    with Client(served.address) as c:
        torch.testing.assert_close(c.infer(served.spec.name, 1, x), _expect(served, x, 1))


# ---- correct answers ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 64])
def test_python_client_matches_reference(served, dtype, tokens):
    x = _x(served, tokens, seed=tokens, dtype=dtype)
    with Client(served.address) as c:
        y = c.infer(served.spec.name, 3, x)
    assert y.dtype == dtype
    tol = {} if dtype == torch.float32 else BF16
    torch.testing.assert_close(y, _expect(served, x, 3), **tol)


def test_python_client_takes_numpy(served):
    x = _x(served, 5, seed=4)
    with Client(served.address) as c:
        y = c.infer(served.spec.name, 1, x.numpy())
    assert isinstance(y, np.ndarray)
    torch.testing.assert_close(torch.from_numpy(y), _expect(served, x, 1))


def test_empty_batch_returns_empty_output(served):
    with Client(served.address) as c:
        y = c.infer(served.spec.name, 1, torch.empty(0, served.spec.moe.hidden_size))
    assert y.shape == (0, served.spec.moe.hidden_size)


@pytest.mark.parametrize("datatype", ["FP32", "BF16"])
def test_tritonclient_works_unchanged(served, tmp_path, datatype):
    x = _x(served, 12, seed=5)
    if datatype == "BF16":
        x = x.bfloat16().float()  # exactly representable, so the bf16 the server sees is x
    np.save(tmp_path / "in.npy", x.numpy())
    script = Path(__file__).with_name("_triton_client.py")
    out = subprocess.run(
        [sys.executable, str(script), served.address, served.spec.name, "3", datatype,
         str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    meta = json.loads(out.stdout)
    assert meta == {"live": True, "ready": True, "model_ready": True, "datatype": datatype,
                    "version": 1}
    y = torch.from_numpy(np.load(tmp_path / "out.npy"))
    if datatype == "BF16":
        torch.testing.assert_close(y.bfloat16(), _expect(served, x.bfloat16(), 3), **BF16)
    else:
        torch.testing.assert_close(y, _expect(served, x, 3))


def test_health_and_reflection(served):
    with grpc.insecure_channel(served.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "inference.GRPCInferenceService", "moefleet.v1.Admin"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(refl.ServerReflectionInfo(iter([req]), timeout=10))
        names = {s.name for s in resp.list_services_response.service}
    assert {"inference.GRPCInferenceService", "moefleet.v1.Admin", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_model_metadata_names_hidden_size_and_dtype(served):
    with grpc.insecure_channel(served.address) as ch:
        meta = pb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(
            pb.ModelMetadataRequest(name=served.spec.name), timeout=10)
    assert meta.inputs[0].name == "hidden_states"
    assert list(meta.inputs[0].shape) == [-1, served.spec.moe.hidden_size]
    assert meta.inputs[0].datatype == "FP32"


# ---- error paths -------------------------------------------------------------------------


def _infer_raw(served, request: pb.ModelInferRequest, timeout: float = 30):
    with grpc.insecure_channel(served.address, options=[
            ("grpc.max_send_message_length", 64 << 20)]) as ch:
        return pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=timeout)


def _bad(served, mutate) -> pb.ModelInferRequest:
    req = request_for(served.spec.name, 1, _x(served, 4, seed=1))
    mutate(req)
    return req


def _set_datatype(req, dt):
    req.inputs[0].datatype = dt


def _truncate(req):
    req.raw_input_contents[0] = req.raw_input_contents[0][:-4]


def _rank3(req):
    req.inputs[0].shape[:] = [1, 4, 64]


CASES = {
    "wrong dtype": (lambda r: _set_datatype(r, "INT32"), grpc.StatusCode.INVALID_ARGUMENT),
    "wrong rank": (_rank3, grpc.StatusCode.INVALID_ARGUMENT),
    "byte count": (_truncate, grpc.StatusCode.INVALID_ARGUMENT),
    "no layer": (lambda r: r.parameters.pop("layer"), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown model": (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND),
    "unknown layer": (lambda r: r.parameters["layer"].__setattr__("int64_param", 2),
                      grpc.StatusCode.NOT_FOUND),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_request_gets_status_and_service_keeps_answering(served, case):
    mutate, code = CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        _infer_raw(served, _bad(served, mutate))
    assert err.value.code() == code, err.value.details()
    _assert_still_serving(served)


def test_wrong_hidden_size_is_invalid_argument(served):
    req = request_for(served.spec.name, 1, torch.randn(3, served.spec.moe.hidden_size + 1))
    with pytest.raises(grpc.RpcError) as err:
        _infer_raw(served, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hidden size" in err.value.details()
    _assert_still_serving(served)


def test_too_many_tokens_is_resource_exhausted(served):
    req = request_for(served.spec.name, 1, _x(served, 4097, seed=2, dtype=torch.float16))
    with pytest.raises(grpc.RpcError) as err:
        _infer_raw(served, req)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_still_serving(served)


def test_oversize_message_is_resource_exhausted(served):
    req = request_for(served.spec.name, 1, _x(served, 20000, seed=2))  # 5 MB > 4 MB limit
    with pytest.raises(grpc.RpcError) as err:
        _infer_raw(served, req)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_still_serving(served)


def test_full_queue_is_resource_exhausted_and_nothing_wrong_is_returned(served):
    x = _x(served, 4000, seed=8)
    want = _expect(served, x, 1)

    def one(_):
        try:
            return _infer_raw(served, request_for(served.spec.name, 1, x))
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    codes = [r for r in results if isinstance(r, grpc.StatusCode)]
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes, "16 concurrent requests of 4000 tokens must overflow 4096 outstanding tokens"
    from moefleet.protos.oip import tensor_from_response

    for r in results:
        if not isinstance(r, grpc.StatusCode):
            torch.testing.assert_close(tensor_from_response(r), want)
    _assert_still_serving(served)


def test_a_deadline_that_expires_in_the_client_leaves_the_service_serving(served):
    # 1 ms runs out in the client; that the server itself gives up on a call whose deadline
    # passed is test_admission.py's test_the_server_abandons_a_call_when_its_deadline_passes...
    x = _x(served, 4000, seed=3)
    with Client(served.address, retries=0) as c, pytest.raises(grpc.RpcError) as err:
        c.infer(served.spec.name, 1, x, timeout_s=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_still_serving(served)


def test_status_command_shows_the_served_model(served):
    cli = Path(sys.executable).with_name("moefleet")
    out = subprocess.run([str(cli), "status", "--server", served.address, "-o", "json",
                          "--token", served.token], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    (model,) = status["models"]
    assert model["name"] == served.spec.name and int(model["routing_version"]) == 1
    assert [int(L["layer"]) for L in model["layers"]] == served.spec.layers
    assert len(status["hosts"]) == served.spec.hosts.count
