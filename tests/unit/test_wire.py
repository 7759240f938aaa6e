"""protos/oip.py: tensors survive the OIP encoding bit for bit, and bad requests are named.

Every message goes through SerializeToString / FromString, so the tests see what the
other side of a gRPC call would see.
"""

from __future__ import annotations

import struct

import pytest
import torch

from moefleet.core.errors import InvalidArgument
from moefleet.protos import inference_pb2 as pb
from moefleet.protos import oip as wire

pytestmark = pytest.mark.unit

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
H = 16


def _over_the_wire(message):
    return type(message).FromString(message.SerializeToString())


def _request(t: int = 3, dtype: torch.dtype = torch.float16) -> pb.ModelInferRequest:
    return wire.request_for("mixtral", 5, torch.randn(t, H).to(dtype), "req-7")


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0, 1, 7])
def test_request_round_trip_is_bit_exact(dtype: torch.dtype, t: int) -> None:
    x = torch.randn(t, H).to(dtype)
    call = wire.decode_infer(_over_the_wire(wire.request_for("mixtral", 5, x, "req-7")))
    assert (call.model, call.layer, call.request_id) == ("mixtral", 5, "req-7")
    assert call.parameters == {}
    assert call.x.dtype == dtype and call.x.shape == (t, H)
    assert torch.equal(call.x, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0, 1, 7])
def test_response_round_trip_is_bit_exact(dtype: torch.dtype, t: int) -> None:
    call = wire.decode_infer(_request(t, dtype))
    y = torch.randn(t, H).to(dtype)
    resp = _over_the_wire(wire.encode_infer(call, y, {}))
    assert (resp.model_name, resp.id) == ("mixtral", "req-7")
    assert resp.outputs[0].name == "hidden_states"
    assert list(resp.outputs[0].shape) == [t, H]
    assert torch.equal(wire.tensor_from_response(resp), y)


def test_request_wire_layout_is_little_endian_row_major() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    req = wire.request_for("m", 0, x)
    tensor = req.inputs[0]
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("hidden_states", "FP32", [2, 2])
    assert req.raw_input_contents[0] == struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    assert req.parameters["layer"].int64_param == 0


def test_non_contiguous_input_is_sent_in_logical_order() -> None:
    x = torch.randn(H, 5).t()  # [5, H], strided
    call = wire.decode_infer(_over_the_wire(wire.request_for("m", 1, x)))
    assert torch.equal(call.x, x)


def test_fp32_typed_contents_are_accepted() -> None:
    x = torch.randn(4, H)
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="hidden_states", datatype="FP32", shape=[4, H])
    req.inputs[0].contents.fp32_contents.extend(x.flatten().tolist())
    req.parameters["layer"].int64_param = 2
    call = wire.decode_infer(_over_the_wire(req))
    assert torch.equal(call.x, x)


def test_decoded_tensor_is_writable_and_owns_its_memory() -> None:
    req = _request(2, torch.float32)
    call = wire.decode_infer(req)
    call.x.zero_()
    assert any(req.raw_input_contents[0])


def test_output_is_cast_to_the_input_dtype() -> None:
    call = wire.decode_infer(_request(3, torch.bfloat16))
    y = torch.randn(3, H)  # fp32, as a combine step might produce
    resp = _over_the_wire(wire.encode_infer(call, y, {}))
    assert resp.outputs[0].datatype == "BF16"
    assert torch.equal(wire.tensor_from_response(resp), y.to(torch.bfloat16))


def test_response_parameters_keep_their_types() -> None:
    call = wire.decode_infer(_request())
    params = {"routing_version": 12, "cached": True, "host": "h0", "queue_ms": 0.25}
    resp = _over_the_wire(wire.encode_infer(call, torch.zeros(3, H), params))
    got = {k: resp.parameters[k] for k in params}
    assert got["routing_version"].int64_param == 12
    assert got["cached"].bool_param is True
    assert got["host"].string_param == "h0"
    assert got["queue_ms"].double_param == 0.25


def test_request_parameters_other_than_layer_are_passed_through() -> None:
    req = _request()
    req.parameters["priority"].uint64_param = 3
    req.parameters["tag"].string_param = "a"
    req.parameters["unset"].CopyFrom(pb.InferParameter())
    call = wire.decode_infer(_over_the_wire(req))
    assert call.parameters == {"priority": 3, "tag": "a"}


def test_dtype_table_itemsizes_match_torch() -> None:
    for d in wire.WIRE_DTYPES:
        assert d.itemsize == d.torch_dtype.itemsize
    assert {d.datatype for d in wire.WIRE_DTYPES} == {"FP32", "FP16", "BF16"}


def test_client_side_rejects_unsupported_tensors() -> None:
    with pytest.raises(TypeError, match="dtype"):
        wire.request_for("m", 0, torch.zeros(2, H, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        wire.request_for("m", 0, torch.zeros(2, 3, H))


# ---- request violations ----------------------------------------------------------------------


def _no_inputs(r):
    del r.inputs[:]


def _two_inputs(r):
    r.inputs.add(name="hidden_states", datatype="FP16", shape=[3, H])


def _wrong_name(r):
    r.inputs[0].name = "x"


def _wrong_dtype(r):
    r.inputs[0].datatype = "FP64"


def _rank_one(r):
    r.inputs[0].shape[:] = [3 * H]


def _rank_three(r):
    r.inputs[0].shape[:] = [1, 3, H]


def _negative_dim(r):
    r.inputs[0].shape[:] = [-3, -H]


def _short_bytes(r):
    r.raw_input_contents[0] = r.raw_input_contents[0][:-1]


def _two_raw_entries(r):
    r.raw_input_contents.append(b"")


def _raw_and_contents(r):
    r.inputs[0].contents.fp32_contents.append(1.0)


def _fp16_without_raw(r):
    del r.raw_input_contents[:]


def _fp32_contents_wrong_count(r):
    r.inputs[0].datatype = "FP32"
    del r.raw_input_contents[:]
    r.inputs[0].contents.fp32_contents.extend([0.0] * 5)


def _no_layer(r):
    del r.parameters["layer"]


def _layer_as_string(r):
    r.parameters["layer"].string_param = "3"


def _layer_as_double(r):
    r.parameters["layer"].double_param = 3.0


def _layer_unset(r):
    r.parameters["layer"].CopyFrom(pb.InferParameter())


def _input_in_shared_memory(r):
    r.inputs[0].parameters["shared_memory_region"].string_param = "region0"


def _output_to_shared_memory(r):
    out = r.outputs.add(name="hidden_states")
    out.parameters["shared_memory_byte_size"].int64_param = 96


def _output_as_classes(r):
    r.outputs.add(name="hidden_states").parameters["classification"].int64_param = 2


VIOLATIONS = [
    (_no_inputs, r"inputs: expected exactly one tensor named 'hidden_states', got 0"),
    (_two_inputs, r"inputs: expected exactly one .* got 2"),
    (_wrong_name, r"inputs\[0\]\.name: expected 'hidden_states', got 'x'"),
    (_wrong_dtype, r"inputs\[0\]\.datatype: expected one of FP32, FP16, BF16, got 'FP64'"),
    (_rank_one, r"inputs\[0\]\.shape: expected rank 2"),
    (_rank_three, r"inputs\[0\]\.shape: expected rank 2 \[T, H\], got \[1, 3, 16\]"),
    (_negative_dim, r"inputs\[0\]\.shape: dimensions must be >= 0"),
    (_short_bytes, r"raw_input_contents\[0\]: expected 96 bytes for shape \[3, 16\] FP16, got 95"),
    (_two_raw_entries, r"raw_input_contents: expected one entry .* got 2"),
    (_raw_and_contents, r"inputs\[0\]\.contents: data sent both"),
    (_fp16_without_raw, r"raw_input_contents: empty, but FP16 data must be sent there"),
    (_fp32_contents_wrong_count, r"fp32_contents: expected 48 values .* got 5"),
    (_no_layer, r"parameters\['layer'\]: required"),
    (_layer_as_string, r"parameters\['layer'\]: must be an int64_param, got string_param"),
    (_layer_as_double, r"parameters\['layer'\]: must be an int64_param, got double_param"),
    (_layer_unset, r"parameters\['layer'\]: must be an int64_param, got no value"),
    (_input_in_shared_memory, r"inputs\[0\]\.parameters\['shared_memory_region'\]: shared memory is not"),
    (_output_to_shared_memory, r"outputs\[0\]\.parameters\['shared_memory_byte_size'\]: shared memory"),
    (_output_as_classes, r"outputs\[0\]\.parameters\['classification'\]: classification is not"),
]


@pytest.mark.parametrize(
    ("corrupt", "message"), VIOLATIONS, ids=[f.__name__.strip("_") for f, _ in VIOLATIONS]
)
def test_bad_request_raises_invalid_argument_naming_the_field(corrupt, message: str) -> None:
    req = _request(3, torch.float16)
    corrupt(req)
    with pytest.raises(InvalidArgument, match=message) as info:
        wire.decode_infer(_over_the_wire(req))
    assert info.value.code == "INVALID_ARGUMENT"


def test_malformed_response_is_rejected_naming_the_field() -> None:
    call = wire.decode_infer(_request(3, torch.float16))
    resp = wire.encode_infer(call, torch.zeros(3, H), {})
    resp.outputs[0].shape[:] = [4, H]
    with pytest.raises(InvalidArgument, match=r"raw_output_contents\[0\]: expected 128 bytes"):
        wire.tensor_from_response(_over_the_wire(resp))
