"""protos/: the checked-in code is fresh, speaks Triton's wire protocol, and runs on protobuf 7.

Our `inference_pb2` and `tritonclient.grpc` both register `inference.*` in protobuf's default
descriptor pool, so whichever is imported second fails with a duplicate-symbol TypeError.
Everything that needs tritonclient therefore runs in a child interpreter that never imports
moefleet; the two sides exchange serialized bytes through files, as a client and a server
exchange them over gRPC.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from google.protobuf import descriptor_pb2, text_format

from moefleet.protos import admin_pb2
from moefleet.protos import inference_pb2 as pb
from moefleet.protos import oip as wire

pytestmark = pytest.mark.unit

PROTOS_DIR = Path(__file__).resolve().parents[2] / "protos"
GENERATED = [
    f"{name}{suffix}"
    for name in ("inference", "admin")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
]
H = 8
_DATATYPE = {d.torch_dtype: d.datatype for d in wire.WIRE_DTYPES}


def _needs_tritonclient() -> None:
    """Skip unless tritonclient[grpc] is installed, without importing it into this process."""
    if importlib.util.find_spec("tritonclient.grpc") is None:
        pytest.skip("needs tritonclient[grpc] (the test extra)")


def _run_child(python: str, script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `script` in a fresh interpreter; return its stdout and stderr, failing on rc != 0."""
    done = subprocess.run(
        [python, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, f"child failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


# ---- staleness ---------------------------------------------------------------------------------


def test_checked_in_generated_code_is_fresh(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("needs grpcio-tools (the test extra) to regenerate protos")
    cmd = [sys.executable, str(PROTOS_DIR / "generate.py"), "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"protos/generate.py failed:\n{done.stderr}"
    stale = [n for n in GENERATED if (tmp_path / n).read_bytes() != (PROTOS_DIR / n).read_bytes()]
    assert not stale, f"generated code is stale: {stale}; run `python protos/generate.py`"


# ---- wire compatibility with tritonclient -------------------------------------------------------

_TRITON_CHILD = """
    import json, sys
    from pathlib import Path

    import numpy as np
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import InferInput, InferResult, service_pb2
    from tritonclient.grpc._utils import _get_inference_request
    from tritonclient.utils import triton_to_np_dtype

    work = Path(sys.argv[1])
    fdp = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(fdp)
    (work / "triton_descriptor.bin").write_bytes(fdp.SerializeToString())

    def floats(a):
        return a.astype(np.float64).ravel().tolist()

    report = {}
    for case in json.loads((work / "cases.json").read_text()):
        name, datatype = case["name"], case["datatype"]
        np_dtype = triton_to_np_dtype(datatype)
        req = service_pb2.ModelInferRequest.FromString((work / f"{name}.req").read_bytes())
        t = req.inputs[0]
        x = np.frombuffer(req.raw_input_contents[0], dtype=np_dtype)
        resp = service_pb2.ModelInferResponse.FromString((work / f"{name}.resp").read_bytes())
        y = InferResult(resp).as_numpy("hidden_states")
        report[name] = {
            "request": [req.model_name, req.id, req.parameters["layer"].int64_param,
                        t.name, t.datatype, list(t.shape)],
            "x": floats(x),
            "response": [resp.model_name, resp.id, resp.parameters["version"].int64_param],
            "y": floats(y), "y_dtype": str(y.dtype), "y_shape": list(y.shape),
        }
        z = np.array(case["z"], dtype=np_dtype)
        tensor = InferInput("hidden_states", list(z.shape), datatype).set_data_from_numpy(z)
        own = _get_inference_request(
            "qwen", [tensor], "", "tc-1", None, 0, False, False, 0, None, {"layer": 4, "k": "v"}
        )
        (work / f"{name}.tc_req").write_bytes(own.SerializeToString())
    (work / "report.json").write_text(json.dumps(report))
"""


@dataclass
class _Case:
    x: torch.Tensor  # [T, H], we send it in a request
    y: torch.Tensor  # [T, H], we send it in a response
    z: torch.Tensor  # [T, H], tritonclient sends it in a request


@dataclass
class _Exchange:
    cases: dict[str, _Case]
    report: dict  # what tritonclient decoded from our messages, by case name
    work: Path


def _send_ours(work: Path, name: str, case: _Case) -> None:
    req = wire.request_for("mixtral", 2, case.x, f"id-{name}")
    resp = wire.encode_infer(wire.decode_infer(req), case.y, {"version": 9})
    (work / f"{name}.req").write_bytes(req.SerializeToString())
    (work / f"{name}.resp").write_bytes(resp.SerializeToString())


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: pytest.TempPathFactory) -> _Exchange:
    """One child run that decodes our messages with tritonclient and encodes its own."""
    _needs_tritonclient()
    work = tmp_path_factory.mktemp("triton")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    cases = {n: _Case(*(torch.randn(t, H).to(d) for t in (3, 5, 2))) for n, d in dtypes.items()}
    for name, case in cases.items():
        _send_ours(work, name, case)
    manifest = [
        {"name": n, "datatype": _DATATYPE[c.x.dtype], "z": c.z.double().tolist()}
        for n, c in cases.items()
    ]
    (work / "cases.json").write_text(json.dumps(manifest))
    _run_child(sys.executable, _TRITON_CHILD, str(work))
    return _Exchange(cases, json.loads((work / "report.json").read_text()), work)


_FileProto = descriptor_pb2.FileDescriptorProto


def _descriptors(exchange: _Exchange) -> tuple[_FileProto, _FileProto]:
    ours, theirs = _FileProto(), _FileProto()
    pb.DESCRIPTOR.CopyToProto(ours)
    theirs.ParseFromString((exchange.work / "triton_descriptor.bin").read_bytes())
    return ours, theirs


def _same_floats(got: list[float], want: torch.Tensor) -> bool:
    return torch.equal(torch.tensor(got, dtype=torch.float64), want.double().flatten())


def test_inference_messages_match_tritons_field_for_field(exchange: _Exchange) -> None:
    ours, theirs = _descriptors(exchange)
    assert (ours.package, ours.syntax) == (theirs.package, theirs.syntax) == ("inference", "proto3")
    assert len(ours.message_type) == 14  # the 6 rpcs' messages, InferParameter, contents
    by_name = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        assert message.name in by_name, f"{message.name} is not a Triton message"
        assert message == by_name[message.name], (
            f"{message.name} differs from Triton's:\nours:\n{text_format.MessageToString(message)}"
            f"\nTriton's:\n{text_format.MessageToString(by_name[message.name])}"
        )


def test_inference_service_is_a_subset_of_tritons(exchange: _Exchange) -> None:
    ours, theirs = _descriptors(exchange)
    [service], [their_service] = ours.service, theirs.service
    assert service.name == their_service.name == "GRPCInferenceService"
    their_methods = {m.name: m for m in their_service.method}
    assert [m.name for m in service.method] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"
    ]  # fmt: skip
    for method in service.method:
        assert method == their_methods[method.name]


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_tritonclient_decodes_our_request_and_response(exchange: _Exchange, name: str) -> None:
    case, seen = exchange.cases[name], exchange.report[name]
    datatype = _DATATYPE[case.x.dtype]
    assert seen["request"] == ["mixtral", f"id-{name}", 2, "hidden_states", datatype, [3, H]]
    assert _same_floats(seen["x"], case.x)
    assert seen["response"] == ["mixtral", f"id-{name}", 9]
    assert seen["y_dtype"] == str(case.y.dtype).removeprefix("torch.")
    assert seen["y_shape"] == [5, H]
    assert _same_floats(seen["y"], case.y)


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_we_decode_a_request_built_by_tritonclient(exchange: _Exchange, name: str) -> None:
    case = exchange.cases[name]
    req = pb.ModelInferRequest.FromString((exchange.work / f"{name}.tc_req").read_bytes())
    call = wire.decode_infer(req)
    assert (call.model, call.layer, call.request_id) == ("qwen", 4, "tc-1")
    assert call.parameters == {"k": "v"}
    assert call.x.dtype == case.z.dtype
    assert torch.equal(call.x, case.z)


_CONFLICT_CHILD = """
    from tritonclient.grpc import service_pb2
    try:
        from moefleet.protos import inference_pb2
    except TypeError as e:
        print("conflict:", str(e).splitlines()[-1])
    else:
        print("no conflict")
"""


def test_tritonclient_and_our_inference_module_cannot_share_a_process() -> None:
    """Documents why the tests above use a child process; e2e clients must do the same."""
    _needs_tritonclient()
    out = _run_child(sys.executable, _CONFLICT_CHILD)
    assert "conflict: " in out and "inference.ServerLiveRequest" in out, out


# ---- protobuf 7 ----------------------------------------------------------------------------------

_PROTO7_CHILD = """
    import sys
    import google.protobuf, grpc
    from moefleet.protos import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

    major = int(google.protobuf.__version__.split(".")[0])
    assert major >= 7, f"this interpreter has protobuf {google.protobuf.__version__}, not 7+"
    req = inference_pb2.ModelInferRequest.FromString(bytes.fromhex(sys.argv[1]))
    status = admin_pb2.StatusResponse.FromString(bytes.fromhex(sys.argv[2]))
    inference_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel("localhost:1"))
    admin_pb2_grpc.AdminStub(grpc.insecure_channel("localhost:1"))
    print("versions", google.protobuf.__version__, grpc.__version__, inference_pb2.__file__)
    print("request", req.SerializeToString(deterministic=True).hex())
    print("status", status.SerializeToString(deterministic=True).hex())
"""


def _status() -> admin_pb2.StatusResponse:
    replica = admin_pb2.ReplicaStatus(host="h0", slot=3)
    expert = admin_pb2.ExpertStatus(expert=7, replicas=[replica])
    layer = admin_pb2.LayerStatus(layer=1, experts=[expert])
    model = admin_pb2.ModelStatus(
        name="m", routing_version=2**40, dtype="bfloat16", hidden_size=H, layers=[layer]
    )
    host = admin_pb2.HostStatus(id="h0", node_ip="10.0.0.1", device="cpu", slots_total=4)
    return admin_pb2.StatusResponse(models=[model], hosts=[host])


def _proto7_env(tmp_path: Path) -> dict[str, str]:
    """An environment where `moefleet.protos` resolves to this repo's protos/ folder."""
    (tmp_path / "moefleet").mkdir()
    (tmp_path / "moefleet" / "protos").symlink_to(PROTOS_DIR, target_is_directory=True)
    return {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}


def test_generated_code_round_trips_on_protobuf_7(tmp_path: Path) -> None:
    python = os.environ.get("MOEFLEET_PROTO7_PYTHON")
    if not python:
        pytest.skip("set MOEFLEET_PROTO7_PYTHON to a python with protobuf>=7 and grpcio")
    req = wire.request_for("m", 3, torch.randn(2, H).to(torch.bfloat16), "r")
    req.parameters["priority"].uint64_param = 5
    want = [
        req.SerializeToString(deterministic=True),
        _status().SerializeToString(deterministic=True),
    ]
    out = _run_child(python, _PROTO7_CHILD, *(w.hex() for w in want), env=_proto7_env(tmp_path))
    print(out)  # shown with -s / -rP: the versions, and any gencode warning on stderr
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert bytes.fromhex(lines["request"]) == want[0]
    assert bytes.fromhex(lines["status"]) == want[1]
