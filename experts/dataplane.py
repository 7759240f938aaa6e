"""The expert host's data plane: a tiny gRPC service that runs one batch of rows, as raw bytes.

    Run(request) -> reply
      request  header (magic, dtype, N, H, M) | slot_ids int32 [M] | counts int32 [M] | x [N, H]
      reply    y [N, H], in x's dtype, row for row

The router calls it directly, host by host, for batches small enough that a Ray actor call
(its scheduling and object-store round trip) would cost more than the bytes. Every call must
carry the service's internal secret in its metadata; one without it is refused with
UNAUTHENTICATED. The server binds the address it is given (the node's own IP in the service),
on a port the OS picks.

Knows nothing of Ray, gating or routing tables: `serve` takes any `run(x, slot_ids, counts)`.

# N = rows, H = hidden, M = slots in the batch
"""

from __future__ import annotations

import hmac
import struct
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import torch

__all__ = ["RUN_METHOD", "SECRET_KEY", "GRPC_OPTIONS", "encode_request", "decode_request",
           "encode_reply", "decode_reply", "serve"]

RUN_METHOD = "/moefleet.dataplane.v1.DataPlane/Run"
SECRET_KEY = "moefleet-dataplane-secret"  # metadata key of the internal secret
GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

_MAGIC = b"MFD1"
_HEADER = struct.Struct("<4sB3xIII")  # magic, dtype code, N, H, M
_DTYPE_OF_CODE = (torch.float32, torch.bfloat16, torch.float16)  # dtype code -> dtype
_WORKERS = 1  # calls run one at a time, as a host's Ray calls do

RunFn = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


# ---- codec --------------------------------------------------------------------------------

def encode_request(x: torch.Tensor, slot_ids: torch.Tensor, counts: torch.Tensor) -> bytes:
    """x: [N, H] rows sorted by slot, slot_ids/counts: [M] -> one message (a single copy of x)."""
    x = x.detach().cpu().contiguous()
    head = _HEADER.pack(_MAGIC, _DTYPE_OF_CODE.index(x.dtype), x.shape[0], x.shape[1], slot_ids.numel())
    meta = np.stack([slot_ids.cpu().numpy(), counts.cpu().numpy()]).astype(np.int32)  # [2, M]
    return b"".join((head, meta.data, _bytes_of(x)))


def decode_request(data: bytes) -> tuple[torch.Tensor, list[int], list[int]]:
    """The inverse of `encode_request`: x [N, H] is a read-only view of `data` (no copy).
    Raises ValueError on a malformed message."""
    if len(data) < _HEADER.size:
        raise ValueError(f"data-plane request of {len(data)} bytes has no header")
    magic, code, n, h, m = _HEADER.unpack_from(data)
    if magic != _MAGIC or code >= len(_DTYPE_OF_CODE):
        raise ValueError("not a data-plane request (bad magic or dtype)")
    dtype = _DTYPE_OF_CODE[code]
    want = _HEADER.size + 8 * m + n * h * dtype.itemsize
    if len(data) != want:
        raise ValueError(f"data-plane request of {len(data)} bytes; its header says {want}")
    meta = _view(data, torch.int32, _HEADER.size, 2 * m).reshape(2, m).tolist()
    x = _view(data, dtype, _HEADER.size + 8 * m, n * h).reshape(n, h)
    return x, meta[0], meta[1]


def encode_reply(y: torch.Tensor) -> bytes:
    """y: [N, H] -> its raw bytes."""
    return _bytes_of(y.detach().cpu().contiguous()).tobytes()


def decode_reply(data: bytes, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """The reply to a request x of `shape` [N, H] and `dtype` -> y [N, H], a read-only view."""
    n, h = shape
    if len(data) != n * h * dtype.itemsize:
        raise ValueError(f"data-plane reply of {len(data)} bytes is not [{n}, {h}] {dtype}")
    return _view(data, dtype, 0, n * h).reshape(n, h)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _view(data: bytes, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable"
        return torch.frombuffer(data, dtype=dtype, count=count, offset=offset)


# ---- server -------------------------------------------------------------------------------

def serve(run: RunFn, host: str, secret: str) -> tuple[grpc.Server, str]:
    """Start the data-plane server on `host` (an IP, never 0.0.0.0 in the service), a free
    port -> (server, "HOST:PORT"). `run(x [N, H], slot_ids, counts) -> y [N, H]`."""
    if not secret:
        raise ValueError("the data plane needs a secret")
    server = grpc.server(ThreadPoolExecutor(_WORKERS), options=GRPC_OPTIONS)
    service, method = RUN_METHOD.split("/")[1:]
    # registered with the core: a call is matched to it there, not by a handler lookup per call
    server.add_registered_method_handlers(service, {method: _handler(run, secret)})
    where = f"[{host}]" if ":" in host else host
    port = server.add_insecure_port(f"{where}:0")
    server.start()
    return server, f"{where}:{port}"


def _handler(run: RunFn, secret: str) -> grpc.RpcMethodHandler:
    key = secret.encode()

    def call(data: bytes, context: grpc.ServicerContext) -> bytes:
        given = dict(context.invocation_metadata()).get(SECRET_KEY, "")
        if not hmac.compare_digest(given.encode(), key):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "data-plane call without the secret")
        try:
            x, slot_ids, counts = decode_request(data)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            return encode_reply(run(x, slot_ids, counts))
        except LookupError as e:  # a slot that holds no expert
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    return grpc.unary_unary_rpc_method_handler(call)  # bytes in, bytes out
