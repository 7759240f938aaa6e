"""Conversion between Open Inference Protocol messages and tensors (from_proto / to_proto).

Server side (the router): `decode_infer` turns a ModelInferRequest into an `InferCall`, and
`encode_infer` turns the layer output back into a ModelInferResponse. Client side:
`request_for` and `tensor_from_response` are the inverses, so the tensor encoding lives
here once, beside the messages, and the client needs nothing of the router.

moefleet's conventions on top of the protocol:
  * one input and one output tensor, both named "hidden_states", shape [T, H];
  * datatype FP32, FP16 or BF16, the output's matching the input's;
  * data as little-endian row-major bytes in raw_input_contents / raw_output_contents
    (FP32 input may instead come as contents.fp32_contents);
  * the request parameter "layer" (int64_param) names the MoE layer;
  * each model has one version, "1" (an empty version means it too);
  * requested outputs, when listed, can only be "hidden_states";
  * no shared memory and no classification: a tensor parameter asking for either is refused.

Violations raise `InvalidArgument` naming the offending field (a request over the caller's
token limit: `ResourceExhausted`, found from its declared shape before any data is copied).
Client-given strings are quoted cut short. This module knows nothing about models, layers or
hidden sizes: whether `layer` exists and `H` matches the model is
the router's check. It does no maths and imports no grpc.
"""
# T = tokens, H = hidden size

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from moefleet.core.errors import InvalidArgument, NotFound, ResourceExhausted, quote
from moefleet.protos import inference_pb2 as pb

__all__ = [
    "TENSOR_NAME",
    "LAYER_PARAM",
    "MODEL_VERSION",
    "check_version",
    "WireDtype",
    "WIRE_DTYPES",
    "InferCall",
    "decode_infer",
    "encode_infer",
    "request_for",
    "tensor_from_response",
]

TENSOR_NAME = "hidden_states"
LAYER_PARAM = "layer"
MODEL_VERSION = "1"

ParamValue = int | str | bool | float


# ---- dtype table -------------------------------------------------------------------------


@dataclass(frozen=True)
class WireDtype:
    datatype: str  # the OIP datatype string
    torch_dtype: torch.dtype
    itemsize: int  # bytes per element


WIRE_DTYPES = (
    WireDtype("FP32", torch.float32, 4),
    WireDtype("FP16", torch.float16, 2),
    WireDtype("BF16", torch.bfloat16, 2),
)
_BY_DATATYPE = {d.datatype: d for d in WIRE_DTYPES}
_BY_TORCH = {d.torch_dtype: d for d in WIRE_DTYPES}
_ACCEPTED = ", ".join(_BY_DATATYPE)


# ---- server side -------------------------------------------------------------------------


@dataclass
class InferCall:
    """One decoded ModelInfer request; `parameters` holds every request parameter but `layer`."""

    model: str
    layer: int
    x: torch.Tensor  # [T, H]
    request_id: str = ""
    parameters: dict[str, ParamValue] = field(default_factory=dict)


def decode_infer(request: pb.ModelInferRequest, max_tokens: int | None = None) -> InferCall:
    """Validate and unpack a request; `x` is a CPU tensor [T, H] of the sent dtype that reads
    the request's bytes in place (no copy): read-only, never to be written to.
    A declared T over `max_tokens` is refused before the data is read."""
    check_version(request.model_name, request.model_version)
    for i, out in enumerate(request.outputs):
        if out.name != TENSOR_NAME:
            raise InvalidArgument(f"outputs[{i}].name: the only output is '{TENSOR_NAME}', "
                                  f"got {quote(out.name)}")
        _check_tensor_params(out.parameters, f"outputs[{i}]")
    for i, meta in enumerate(request.inputs):
        _check_tensor_params(meta.parameters, f"inputs[{i}]")
    x = _decode_tensor(request.inputs, request.raw_input_contents, "input", max_tokens, copy=False)
    params = _values_of(request.parameters)
    params.pop(LAYER_PARAM, None)
    return InferCall(
        model=request.model_name,
        layer=_layer_of(request.parameters),
        x=x,
        request_id=request.id,
        parameters=params,
    )


def check_version(model: str, version: str) -> None:
    """NotFound unless `version` names the one version moefleet serves (or is empty)."""
    if version not in ("", MODEL_VERSION):
        raise NotFound(f"model {quote(model)} has no version {quote(version)}; "
                       f"its only version is '{MODEL_VERSION}'")


def encode_infer(
    call: InferCall, y: torch.Tensor, parameters: Mapping[str, ParamValue]
) -> pb.ModelInferResponse:
    """Pack the layer output y [T, H] (cast to the input's dtype) as the reply to `call`."""
    y = y.to(device="cpu", dtype=call.x.dtype)
    out = pb.ModelInferResponse(model_name=call.model, id=call.request_id)
    out.outputs.append(pb.ModelInferResponse.InferOutputTensor(**_meta_of(y)))
    out.raw_output_contents.append(_bytes_of(y))
    _set_params(out.parameters, parameters)
    return out


# ---- client side -------------------------------------------------------------------------


def request_for(
    model: str, layer: int, x: torch.Tensor, request_id: str = ""
) -> pb.ModelInferRequest:
    """Build the request that runs MoE layer `layer` of `model` over x [T, H]."""
    x = x.to("cpu")
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.append(pb.ModelInferRequest.InferInputTensor(**_meta_of(x)))
    req.raw_input_contents.append(_bytes_of(x))
    req.parameters[LAYER_PARAM].int64_param = layer
    return req


def tensor_from_response(response: pb.ModelInferResponse) -> torch.Tensor:
    """The output hidden states [T, H] of a reply; InvalidArgument if it is malformed."""
    return _decode_tensor(response.outputs, response.raw_output_contents, "output")


# ---- tensors -----------------------------------------------------------------------------


def _meta_of(t: torch.Tensor) -> dict[str, object]:
    if t.dim() != 2:
        raise ValueError(f"{TENSOR_NAME} must have shape [T, H], got {list(t.shape)}")
    if t.dtype not in _BY_TORCH:
        raise TypeError(f"{TENSOR_NAME} dtype must be one of {list(_BY_TORCH)}, got {t.dtype}")
    return {"name": TENSOR_NAME, "datatype": _BY_TORCH[t.dtype].datatype, "shape": list(t.shape)}


def _bytes_of(t: torch.Tensor) -> bytes:
    """Row-major bytes of a CPU tensor, in native (little-endian) order."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _decode_tensor(metas: Sequence, raws: Sequence[bytes], kind: str,
                   max_tokens: int | None = None, copy: bool = True) -> torch.Tensor:
    """The single `hidden_states` tensor of `inputs` or `outputs` (kind = input / output);
    raw bytes are copied into a writable tensor unless `copy` is False."""
    if len(metas) != 1:
        raise InvalidArgument(
            f"{kind}s: expected exactly one tensor named '{TENSOR_NAME}', got {len(metas)}"
        )
    meta, where = metas[0], f"{kind}s[0]"
    if meta.name != TENSOR_NAME:
        raise InvalidArgument(f"{where}.name: expected '{TENSOR_NAME}', got {quote(meta.name)}")
    dtype = _dtype_of(meta.datatype, f"{where}.datatype")
    t, h = _shape_of(meta.shape, f"{where}.shape")
    if max_tokens is not None and t > max_tokens:
        raise ResourceExhausted(f"{t} tokens in one request; the limit is {max_tokens}")
    raw_field = f"raw_{kind}_contents"
    if len(raws) == 0:
        return _from_contents(meta.contents, dtype, t, h, where, raw_field)
    if meta.HasField("contents"):
        raise InvalidArgument(f"{where}.contents: data sent both here and in {raw_field}")
    return _from_raw(raws, dtype, t, h, raw_field, copy)


def _dtype_of(datatype: str, where: str) -> WireDtype:
    if datatype not in _BY_DATATYPE:
        raise InvalidArgument(f"{where}: expected one of {_ACCEPTED}, got {quote(datatype)}")
    return _BY_DATATYPE[datatype]


def _shape_of(shape: Sequence[int], where: str) -> tuple[int, int]:
    if len(shape) != 2:
        dims = list(shape) if len(shape) <= 8 else f"{list(shape[:8])}… (rank {len(shape)})"
        raise InvalidArgument(f"{where}: expected rank 2 [T, H], got {dims}")
    if min(shape) < 0:
        raise InvalidArgument(f"{where}: dimensions must be >= 0, got {list(shape)}")
    return shape[0], shape[1]


def _from_raw(raws: Sequence[bytes], dtype: WireDtype, t: int, h: int, where: str,
              copy: bool) -> torch.Tensor:
    if len(raws) != 1:
        raise InvalidArgument(f"{where}: expected one entry (one tensor), got {len(raws)}")
    data = raws[0]
    expected = t * h * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{where}[0]: expected {expected} bytes for shape [{t}, {h}] {dtype.datatype}, "
            f"got {len(data)}"
        )
    if expected == 0:
        return torch.empty((t, h), dtype=dtype.torch_dtype)
    if copy:
        return torch.frombuffer(bytearray(data), dtype=dtype.torch_dtype).view(t, h)  # [T, H]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable"
        return torch.frombuffer(data, dtype=dtype.torch_dtype).view(t, h)  # [T, H], shares data


def _from_contents(
    contents: pb.InferTensorContents, dtype: WireDtype, t: int, h: int, where: str, raw_field: str
) -> torch.Tensor:
    if dtype.datatype != "FP32":
        raise InvalidArgument(
            f"{raw_field}: empty, but {dtype.datatype} data must be sent there as raw bytes"
        )
    stray = [f.name for f, _ in contents.ListFields() if f.name != "fp32_contents"]
    if stray:
        raise InvalidArgument(f"{where}.contents: FP32 data goes in fp32_contents alone; "
                              f"{', '.join(stray)} given too")
    values = contents.fp32_contents
    if len(values) != t * h:
        raise InvalidArgument(
            f"{where}.contents.fp32_contents: expected {t * h} values for shape [{t}, {h}], "
            f"got {len(values)}"
        )
    x = np.fromiter(values, dtype=np.float32, count=t * h)  # no list of Python floats
    return torch.from_numpy(x).view(t, h)  # [T, H]


# ---- parameters --------------------------------------------------------------------------

# Tensor parameters of the protocol's extensions that ask for something moefleet does not do:
# refused, never ignored (the client would read an answer it did not ask for).
_UNSUPPORTED = {
    **dict.fromkeys(("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"),
                    "shared memory is not supported; send the tensor's bytes in the message"),
    "classification": "classification is not supported; the output is the layer's hidden states",
}


def _check_tensor_params(params: Mapping[str, pb.InferParameter], where: str) -> None:
    for name in params:
        if name in _UNSUPPORTED:
            raise InvalidArgument(f"{where}.parameters['{name}']: {_UNSUPPORTED[name]}")


def _layer_of(params: Mapping[str, pb.InferParameter]) -> int:
    where = f"parameters['{LAYER_PARAM}']"
    if LAYER_PARAM not in params:
        raise InvalidArgument(f"{where}: required (int64_param, the MoE layer index) but missing")
    kind = params[LAYER_PARAM].WhichOneof("parameter_choice")
    if kind != "int64_param":
        raise InvalidArgument(f"{where}: must be an int64_param, got {kind or 'no value'}")
    return params[LAYER_PARAM].int64_param


def _values_of(params: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue]:
    """Plain Python values of a parameter map; entries with no value set are dropped."""
    out = {}
    for key, p in params.items():
        kind = p.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(p, kind)
    return out


def _set_params(target, values: Mapping[str, ParamValue]) -> None:
    for key, value in values.items():
        _set_param(target[key], key, value)


def _set_param(p: pb.InferParameter, key: str, value: ParamValue) -> None:
    if isinstance(value, bool):  # before int: bool is an int
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        raise TypeError(f"parameter '{key}': unsupported type {type(value).__name__}")
