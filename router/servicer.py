"""The gRPC face of the router: the Open Inference Protocol servicer, the error interceptor,
and the server that carries them plus health checking and reflection.

The servicer only validates, converts (`wire`) and delegates (to the micro-batcher and the
engine). Domain errors become gRPC statuses in exactly one place: `ErrorInterceptor`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from moefleet.protos import inference_pb2 as pb
from moefleet.protos import inference_pb2_grpc as pb_grpc

from .errors import DeadlineExceeded, InvalidArgument, MoefleetError, Overloaded, message_of
from .wire import DTYPES, MODEL_VERSION, TENSOR_NAME, check_version, decode_infer, encode_infer

__all__ = ["InferenceServicer", "ErrorInterceptor", "serve_grpc", "ServerLimits", "TlsConfig",
           "SERVER_NAME"]

log = logging.getLogger(__name__)
SERVER_NAME = "moefleet"
_VERSION = version("moefleet")
_DATATYPE_OF = {d.torch_dtype: d.datatype for d in DTYPES}


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps `MoefleetError` (and timeouts) to gRPC statuses for every unary method, and an
    undecodable request message to INVALID_ARGUMENT."""

    def __init__(self):
        self._wrapped: dict[str, Any] = {}  # method -> its guarded handler, made once

    async def intercept_service(self, continuation, details):
        method = details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(details)
        if handler is None:  # an unknown method: not kept, so no client can grow the dict
            return None
        self._wrapped[method] = _guard(handler, method)
        return self._wrapped[method]


def _guard(handler: Any, method: str) -> Any:
    if handler.unary_unary is not None:
        make, inner = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream is not None:
        make, inner = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        return handler
    return make(_guarded(inner, method), request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)


@dataclass(frozen=True)
class _Undecodable:
    """What `_tolerant` hands on for bytes that are not the method's request message."""

    error: str


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """gRPC runs the deserializer before any handler code, and answers UNKNOWN when it
    raises; this one returns `_Undecodable` instead, so the handler can refuse it cleanly."""
    if deserialize is None:
        return None

    def call(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError, or anything else a parser of bad bytes raises
            return _Undecodable(type(e).__name__)

    return call


def _guarded(inner: Callable[[Any, Any], Any], method: str):
    if inspect.isasyncgenfunction(inner):
        async def stream(request, context: grpc.aio.ServicerContext):
            await _refuse_undecodable(request, context, method)
            async for item in inner(request, context):
                yield item
        return stream

    async def call(request, context: grpc.aio.ServicerContext):
        await _refuse_undecodable(request, context, method)
        try:
            return await inner(request, context)
        except Overloaded as e:  # says when to come back, as gRPC's retry pushback
            pushback = (("grpc-retry-pushback-ms", str(math.ceil(e.retry_after_s * 1e3))),)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _details(message_of(e)),
                                trailing_metadata=pushback)
        except MoefleetError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), _details(message_of(e)))
        except (asyncio.TimeoutError, TimeoutError):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:  # a bug: say which, not where (the log has the traceback)
            log.exception("internal error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL,
                                _details(f"{type(e).__name__}: {message_of(e)}"))

    return call


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the request is not a valid message for {method} ({request.error})")


def _details(message: str) -> str:
    """A status message as gRPC can carry it: one printable text of bounded size."""
    message = _ANSI.sub("", message)
    return message if len(message) <= _MAX_DETAILS else message[:_MAX_DETAILS] + "…"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_DETAILS = 2000


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """`submit(model, layer, x)` -> (y, routing_version); `router` answers model questions."""

    def __init__(self, router: Any, max_request_tokens: int):
        self._router = router
        self._max_request_tokens = max_request_tokens

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._router.ready())

    async def ModelReady(self, request, context):
        known = request.name in self._router.model_names()
        return pb.ModelReadyResponse(ready=known and request.version in ("", MODEL_VERSION))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_VERSION)

    async def ModelMetadata(self, request, context):
        hidden, torch_dtype = self._router.metadata(request.name)  # NotFound if unknown
        check_version(request.name, request.version)
        dtype = _DATATYPE_OF[torch_dtype]
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[MODEL_VERSION],
            platform="moefleet_moe_layer",
            inputs=[tensor(name=TENSOR_NAME, datatype=dtype, shape=[-1, hidden])],
            outputs=[tensor(name=TENSOR_NAME, datatype=dtype, shape=[-1, hidden])],
        )

    async def ModelInfer(self, request, context):
        call = decode_infer(request, self._max_request_tokens)
        timeout = context.time_remaining()
        try:
            y, version = await asyncio.wait_for(
                self._router.submit(call.model, call.layer, call.x), timeout
            )
        except (asyncio.TimeoutError, TimeoutError):
            raise DeadlineExceeded(f"the client's deadline passed after {timeout:.3f}s") from None
        return encode_infer(call, y, {"routing_version": version})


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes for the gRPC port: the server's certificate chain and key, and, for mutual
    TLS, the CA that client certificates must chain to."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None)


@dataclass(frozen=True)
class ServerLimits:
    """What the gRPC server itself refuses before any handler runs: messages over
    `max_receive_bytes`, and calls beyond `max_concurrent_rpcs` at once (both
    RESOURCE_EXHAUSTED)."""

    max_receive_bytes: int
    max_send_bytes: int
    max_concurrent_rpcs: int


async def serve_grpc(
    servicers: list[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    host: str,
    port: int,
    limits: ServerLimits,
    tls: TlsConfig | None = None,
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Start a grpc.aio server on the running loop with the given (add_fn, servicer,
    full service name) triples, health checking and reflection. Returns the bound port."""
    opts = [("grpc.max_receive_message_length", limits.max_receive_bytes),
            ("grpc.max_send_message_length", limits.max_send_bytes)]
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=opts,
                             maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    names = []
    for add, servicer, name in servicers:
        add(servicer, server)
        names.append(name)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, tls.credentials()) if tls is not None
             else server.add_insecure_port(address))
    if bound == 0:
        raise InvalidArgument(f"cannot listen on {address}")
    await server.start()
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health
