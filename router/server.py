"""The router's gRPC face: a grpc.aio server on a thread and event loop of its own (`Intake`),
the door every call passes (`ErrorInterceptor`, `CallSlots`), and the Open Inference Protocol
servicer, plus health checking and reflection.

The servicer only decodes (`protos.oip`) and delegates: a request goes to the micro-batcher
(`submit`), on the Router actor's loop. Domain errors become gRPC statuses in exactly one
place: `ErrorInterceptor`.

Why a loop of its own: grpc.aio takes in each new call through its event loop, a few loop turns
a call. On the loop that also runs the engine, a busy loop took calls in slower than an
overload brought them, and they waited unseen inside gRPC, for seconds, before the door could
refuse them. On a loop of its own the door sees each call as it arrives (bench/RESULTS.md,
"Overload and hostile input"). A timer on that loop ticks `on_tick` (the router's
`Admission`, which admits fewer calls while the machine's CPU is saturated), on the same
thread as the door it controls. `OnLoop` carries calls to the actor's loop: a coroutine method
runs there, a plain one (a read of the router's state) is called directly.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from moefleet.core.errors import DeadlineExceeded, InvalidArgument, MoefleetError, Overloaded, message_of
from moefleet.protos import inference_pb2 as pb
from moefleet.protos import inference_pb2_grpc as pb_grpc
from moefleet.protos.oip import (
    MODEL_VERSION,
    TENSOR_NAME,
    WIRE_DTYPES,
    check_version,
    decode_infer,
    encode_infer,
)

__all__ = ["InferenceServicer", "ErrorInterceptor", "CallSlots", "serve_grpc", "ServerLimits",
           "TlsConfig", "SERVER_NAME", "Intake", "OnLoop", "Service"]

log = logging.getLogger(__name__)
SERVER_NAME = "moefleet"
_VERSION = version("moefleet")
_DATATYPE_OF = {d.torch_dtype: d.datatype for d in WIRE_DTYPES}


INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# (add_XServicer_to_server, servicer, full service name): one gRPC service the server carries
Service = tuple[Callable[[Any, Any], None], Any, str]
Submit = Callable[[str, int, torch.Tensor], Awaitable[tuple[torch.Tensor, int]]]
_UNGATED = "/grpc.health.v1.Health/"  # health checks stay cheap and always answered


@dataclass
class CallSlots:
    """How many calls of one kind may be open at once. A call takes a slot when it arrives,
    before its message is read, and gives it back when it ends; a call that finds none free
    is refused at once with RESOURCE_EXHAUSTED and a retry pushback, its payload never read.

    In place of gRPC's own `maximum_concurrent_rpcs`, which counts every method together: a
    flood of inference calls would then refuse health checks and admin calls too."""

    kind: str
    limit: int
    taken: int = 0
    refusal: Callable[[int], Overloaded | None] = lambda taken: None  # a further check, given `taken`
    on_full: Callable[[], None] = lambda: None  # told of each call refused for want of a slot


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps `MoefleetError` (and timeouts) to gRPC statuses for every unary method, and an
    undecodable request message to INVALID_ARGUMENT. With `limits`, admits unary calls
    through `CallSlots`: ModelInfer calls share `max_concurrent_rpcs`, other calls (metadata,
    admin) `max_other_rpcs`; health checks are not counted."""

    def __init__(self, limits: ServerLimits | None = None,
                 infer_refusal: Callable[[int], Overloaded | None] | None = None,
                 infer_full: Callable[[], None] | None = None):
        """infer_refusal(open calls): asked as each ModelInfer call arrives, before its message
        is read, with how many ModelInfer calls are open; the refusal it returns is the call's
        answer (the router's queue-delay check). infer_full(): told of each ModelInfer call
        refused because all its slots were taken (so that the router's admission counts it)."""
        self._wrapped: dict[str, Any] = {}  # method -> its guarded handler, made once
        self.infer_slots = self.other_slots = None
        if limits is not None:
            self.infer_slots = CallSlots("inference", limits.max_concurrent_rpcs)
            self.other_slots = CallSlots("metadata and admin", limits.max_other_rpcs)
            if infer_refusal is not None:
                self.infer_slots.refusal = infer_refusal
            if infer_full is not None:
                self.infer_slots.on_full = infer_full

    async def intercept_service(self, continuation, details):
        method = details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(details)
        if handler is None:  # an unknown method: not kept, so no client can grow the dict
            return None
        slots = (None if method.startswith(_UNGATED) else
                 self.infer_slots if method == INFER_METHOD else self.other_slots)
        self._wrapped[method] = _guard(handler, method, slots)
        return self._wrapped[method]


def _guard(handler: Any, method: str, slots: CallSlots | None) -> Any:
    deserialize = _tolerant(handler.request_deserializer)
    if handler.unary_unary is not None and slots is not None:
        # Served as a stream-unary handler: grpc.aio reads a unary call's message before its
        # handler runs, a streaming one's only when the handler asks. So the slot check
        # comes first, and a refused call costs no payload.
        return grpc.stream_unary_rpc_method_handler(
            _admitted(_guarded(handler.unary_unary, method), method, slots),
            request_deserializer=deserialize, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        make, inner = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream is not None:
        make, inner = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        return handler
    return make(_guarded(inner, method), request_deserializer=deserialize,
                response_serializer=handler.response_serializer)


def _admitted(unary: Callable[[Any, Any], Any], method: str, slots: CallSlots):
    async def call(requests, context: grpc.aio.ServicerContext):
        if slots.taken >= slots.limit:
            slots.on_full()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"router is overloaded: {slots.taken} {slots.kind} calls open, the most it takes "
                f"at once; retry later", trailing_metadata=_pushback(_SLOT_PUSHBACK_S))
        refusal = slots.refusal(slots.taken)
        if refusal is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _details(message_of(refusal)),
                                trailing_metadata=_pushback(refusal.retry_after_s))
        slots.taken += 1
        try:
            async for request in requests:  # a unary call: its one message
                return await unary(request, context)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} got no request message")
        finally:
            slots.taken -= 1

    return call


def _pushback(seconds: float) -> tuple[tuple[str, str], ...]:
    """gRPC's retry pushback trailer: how long the caller should wait before trying again."""
    return (("grpc-retry-pushback-ms", str(math.ceil(seconds * 1e3))),)


_SLOT_PUSHBACK_S = 0.05


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
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            code, details, trailers = _status_of(e, method)
        # Abort once the error is handled: an AbortError raised while handling it would chain
        # to it, and its traceback holds the frames that hold the request, in a cycle that
        # keeps the payload until the next full collection.
        await context.abort(code, details, trailing_metadata=trailers)

    return call


def _status_of(e: Exception, method: str) -> tuple[grpc.StatusCode, str, tuple]:
    """The status, details and trailers a handler's exception is answered with."""
    if isinstance(e, Overloaded):  # says when to come back, as gRPC's retry pushback
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _details(message_of(e)), _pushback(e.retry_after_s)
    if isinstance(e, MoefleetError):
        return getattr(grpc.StatusCode, e.code), _details(message_of(e)), ()
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", ()
    # a bug: say which, not where (the log has the traceback)
    log.error("internal error in %s", method, exc_info=e)
    return grpc.StatusCode.INTERNAL, _details(f"{type(e).__name__}: {message_of(e)}"), ()


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
    """`router` answers model questions (ready, model_names, metadata); `submit(model, layer,
    x)` -> (y, routing_version) serves a request (the micro-batcher's, on the router's loop)."""

    def __init__(self, router: Any, submit: Submit, max_request_tokens: int):
        self._router = router
        self._submit = submit
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
                self._submit(call.model, call.layer, call.x), timeout
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
    """What the server refuses before any handler code runs, all with RESOURCE_EXHAUSTED:
    messages over `max_receive_bytes` (gRPC itself), ModelInfer calls beyond
    `max_concurrent_rpcs` open at once, and other calls (metadata, admin) beyond
    `max_other_rpcs` (`CallSlots`, in the interceptor)."""

    max_receive_bytes: int
    max_send_bytes: int
    max_concurrent_rpcs: int
    max_other_rpcs: int = 32


async def serve_grpc(
    servicers: list[Service],
    host: str,
    port: int,
    limits: ServerLimits,
    tls: TlsConfig | None = None,
    infer_refusal: Callable[[int], Overloaded | None] | None = None,
    infer_full: Callable[[], None] | None = None,
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Start a grpc.aio server on the running loop with the given (add_fn, servicer,
    full service name) triples, health checking and reflection. Returns the bound port.
    infer_refusal, infer_full: see `ErrorInterceptor`."""
    opts = [("grpc.max_receive_message_length", limits.max_receive_bytes),
            ("grpc.max_send_message_length", limits.max_send_bytes)]
    interceptor = ErrorInterceptor(limits, infer_refusal, infer_full)
    server = grpc.aio.server(interceptors=[interceptor], options=opts)
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


# ---- the server's own thread and loop ----------------------------------------------------

_JOIN_TIMEOUT_S = 5.0
_TICK_S = 0.05  # how often `on_tick` runs


class OnLoop:
    """`target` as seen from another loop: its coroutine methods run on `loop`."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop):
        self._target, self._loop = target, loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        loop = self._loop

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(attr(*args, **kwargs), loop))

        setattr(self, name, call)  # made once a name
        return call


class Intake:
    """A gRPC server (`serve_grpc`) on a thread and event loop of its own."""

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._ticker: Future | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The intake's loop; servicers made for it are handed `OnLoop` views of the caller's."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-intake",
                                            daemon=True)
            self._thread.start()
        return self._loop

    async def start(self, servicers: list[Service], host: str,
                    port: int, limits: ServerLimits, tls: TlsConfig | None = None,
                    infer_refusal: Callable[[int], Any] | None = None,
                    infer_full: Callable[[], None] | None = None,
                    on_tick: Callable[[], None] | None = None) -> int:
        """Listen; returns the bound port. On failure the intake's thread is ended too.
        on_tick() is called on the intake's thread every `_TICK_S` while it listens."""
        try:
            self._server, bound, _ = await self._on_intake(
                serve_grpc(servicers, host, port, limits, tls, infer_refusal, infer_full))
        except BaseException:
            await self._end_thread()
            raise
        if on_tick is not None:
            self._ticker = asyncio.run_coroutine_threadsafe(_every(_TICK_S, on_tick), self.loop)
        return bound

    async def stop(self, grace_s: float) -> None:
        """Stop taking calls, let open ones finish within grace_s, then end the thread."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._server is not None:
            await self._on_intake(self._server.stop(grace_s))
            self._server = None
        await self._end_thread()

    async def _on_intake(self, coro: Any) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def _end_thread(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, _JOIN_TIMEOUT_S)
        if not thread.is_alive():
            loop.close()


async def _every(period_s: float, fn: Callable[[], None]) -> None:
    """fn() every period_s until cancelled; one that raises is logged, and the ticks go on
    (a tick that stopped for good would leave an engaged cap in place)."""
    while True:
        await asyncio.sleep(period_s)
        try:
            fn()
        except Exception:
            log.exception("intake tick %s failed", getattr(fn, "__qualname__", fn))
