"""The gRPC face of the router: the Open Inference Protocol servicer, the error interceptor,
and the server that carries them plus health checking and reflection.

The servicer only validates, converts (`wire`) and delegates (to the micro-batcher and the
engine). Domain errors become gRPC statuses in exactly one place: `ErrorInterceptor`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from moefleet.protos import inference_pb2 as pb
from moefleet.protos import inference_pb2_grpc as pb_grpc

from .errors import DeadlineExceeded, InvalidArgument, MoefleetError, ResourceExhausted
from .wire import DTYPES, decode_infer, encode_infer

__all__ = ["InferenceServicer", "ErrorInterceptor", "serve_grpc", "SERVER_NAME"]

log = logging.getLogger(__name__)
SERVER_NAME = "moefleet"
_VERSION = version("moefleet")
_DATATYPE_OF = {d.torch_dtype: d.datatype for d in DTYPES}


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps `MoefleetError` (and timeouts) to gRPC statuses for every unary method."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _guarded(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _guarded(inner: Callable[[Any, Any], Awaitable[Any]]):
    async def call(request, context: grpc.aio.ServicerContext):
        try:
            return await inner(request, context)
        except MoefleetError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except (asyncio.TimeoutError, TimeoutError):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:  # a bug: say so, rather than a bare "unexpected error"
            log.exception("internal error in %s", getattr(inner, "__name__", inner))
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return call


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
        return pb.ModelReadyResponse(ready=request.name in self._router.model_names())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_VERSION)

    async def ModelMetadata(self, request, context):
        hidden, torch_dtype = self._router.metadata(request.name)  # NotFound if unknown
        dtype = _DATATYPE_OF[torch_dtype]
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            platform="moefleet_moe_layer",
            inputs=[tensor(name="hidden_states", datatype=dtype, shape=[-1, hidden])],
            outputs=[tensor(name="hidden_states", datatype=dtype, shape=[-1, hidden])],
        )

    async def ModelInfer(self, request, context):
        call = decode_infer(request)
        if call.x.shape[0] > self._max_request_tokens:
            raise ResourceExhausted(
                f"{call.x.shape[0]} tokens in one request; the limit is {self._max_request_tokens}"
            )
        timeout = context.time_remaining()
        try:
            y, version = await asyncio.wait_for(
                self._router.submit(call.model, call.layer, call.x), timeout
            )
        except (asyncio.TimeoutError, TimeoutError):
            raise DeadlineExceeded(f"the client's deadline passed after {timeout:.3f}s") from None
        return encode_infer(call, y, {"routing_version": version})


async def serve_grpc(
    servicers: list[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    host: str,
    port: int,
    max_message_bytes: int,
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Start a grpc.aio server on the running loop with the given (add_fn, servicer,
    full service name) triples, health checking and reflection. Returns the bound port."""
    opts = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=opts)
    names = []
    for add, servicer, name in servicers:
        add(servicer, server)
        names.append(name)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise InvalidArgument(f"cannot listen on {host}:{port}")
    await server.start()
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health
