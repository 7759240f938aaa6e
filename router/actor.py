"""The Router actor: a grpc.aio server inside a Ray actor, in front of the engine.

It puts the request path together: the gRPC server (router/server.py, the Open Inference
Protocol and the services the cluster hands it, such as the admin API, on one port), the
micro-batcher that merges concurrent requests per layer (router/batcher.py), the engine
(router/engine.py) and the transport that fans each batch out to the expert hosts
(router/transport.py). A request passes through those, not through this file.

For the Controller it installs new versions (`RoutingState`, router/state.py), says when
older versions have drained, reports the rows routed to each expert and the request
latencies, and tells it when a host is gone.

Routers are restartable actors. A restarted one (Ray runs `__init__` again) takes the current
state from the Controller and listens again on the port it had, which the Controller keeps.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import ray
import torch

from moefleet.core.config import MoEConfig
from moefleet.core.dtypes import TORCH_DTYPES
from moefleet.core.errors import InvalidArgument
from moefleet.protos import inference_pb2, inference_pb2_grpc

from .admission import Admission, AdmissionPolicy
from .batcher import MicroBatcher
from .config import RouterConfig
from .dispatch import LayerTable
from .engine import Engine, LayerState, ModelState
from .memory import freeze_startup_objects, malloc_trim, memory, own_rss_bytes
from .metrics import RouterMetrics
from .server import InferenceServicer, Intake, OnLoop, ServerLimits, Service, TlsConfig
from .state import RoutingState
from .transport import HostLink, Transport

__all__ = ["Router", "receive_limit", "memory_bound"]

log = logging.getLogger(__name__)
# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The
# gRPC intake's thread takes each call in over a few turns of its loop, each needing the GIL
# back from the engine's thread: at 5 ms a turn, calls reached the door late under load.
_GIL_SWITCH_S = 0.001
_TRIM_PERIOD_S = 1.0  # how often an idle router gives freed memory back to the OS
_TRIM_SLACK_BYTES = 32 << 20  # ... after it served a request, or while its own RSS is this much over idle
_TRIM_BACKOFF = 4  # a trim that frees nothing doubles the period, up to 2**4 times
_MESSAGE_OVERHEAD = 64 << 10  # a message's fields and framing besides its tensor bytes
_WIRE_ITEMSIZE = 4  # FP32, the widest datatype a client may send
_REBIND_ATTEMPTS, _REBIND_PAUSE_S = 20, 0.25  # a restarted router taking its port back


def receive_limit(cfg: RouterConfig, models: list[MoEConfig]) -> int:
    """The largest gRPC message the router's port accepts, in bytes: the biggest request it
    would serve (`max_request_tokens` × H in FP32) or AddExpert file (one expert's gate row
    and FFN in FP32) of any served model, plus framing; never over `max_message_mb`. Larger
    messages are refused by gRPC before they are read into memory."""
    need = max((max(cfg.max_request_tokens * m.hidden_size,
                    (3 * m.moe_intermediate_size + 1) * m.hidden_size + 1) for m in models), default=0)
    return min(need * _WIRE_ITEMSIZE + _MESSAGE_OVERHEAD, cfg.max_message_mb << 20)


def _engine_state(state: RoutingState) -> ModelState:
    """The engine's immutable ModelState for the Controller's `RoutingState`."""
    layers = {L: LayerState(lr.gate, LayerTable.from_replicas(lr.replicas), lr.shared)
              for L, lr in state.layers.items()}
    hosts = [HostLink(h.handle, h.dataplane, state.dataplane_secret) for h in state.hosts]
    return ModelState(state.model, state.moe, TORCH_DTYPES[state.dtype], state.version, layers, hosts,
                      [h.id for h in state.hosts])


def memory_bound(cfg: RouterConfig, models: list[MoEConfig]) -> int:
    """Bytes the router's request path may hold at once, beyond its idle level of its own RSS
    (`Router.memory()["own"]`: the RSS less the pages of Ray's object store it has mapped,
    which are the store's): every admitted call's message, its decoded copy and its reply
    (`max_concurrent_rpcs` × 3 × the receive limit), plus the work on `max_queue_tokens`
    tokens (their input, K dispatched rows, K expert answers in fp32 and the output: (2 + 2K)
    × H × 4 bytes a token). Once the load is gone the router gives it back (`_trim_when_idle`)."""
    messages = 3 * cfg.max_concurrent_rpcs * receive_limit(cfg, models)
    per_token = max(((2 + 2 * m.num_experts_per_tok) * m.hidden_size * 4 for m in models), default=0)
    return messages + cfg.max_queue_tokens * per_token


class Router:
    def __init__(self, controller: Any, cfg: RouterConfig, *, name: str, interface: str = "127.0.0.1",
                 services: Sequence[Service] = (), device: str = "auto", tls: TlsConfig | None = None):
        """name: this router's actor name (the Controller keeps its address under it); interface:
        the address its gRPC server binds; services: more gRPC services its port serves
        beside inference (the cluster's admin API)."""
        torch.set_num_threads(max(1, math.ceil(cfg.num_cpus)))  # not Ray's OMP default
        sys.setswitchinterval(_GIL_SWITCH_S)
        self._controller = controller
        self._cfg = cfg
        self._name, self._interface = name, interface
        self._services = list(services)
        self._tls = tls
        self._transport = Transport(cfg.transport, cfg.grpc_max_bytes)
        self._engine = Engine(self._transport, device, on_host_gone=self._host_gone,
                              restore_wait_s=cfg.restore_wait_s)
        self._metrics = RouterMetrics()
        self._batcher = MicroBatcher(
            self._engine, cfg.max_batch_tokens, cfg.max_wait_ms / 1e3, cfg.max_queue_tokens,
            cfg.max_queue_delay_s)
        self._admission = (Admission(self._batcher.refusal, AdmissionPolicy(cfg.min_idle_cpu),
                                     refused_later=lambda: self._batcher.refused)
                           if cfg.min_idle_cpu > 0 else None)
        self._intake = Intake()
        self._ready = False
        self._trimmer: asyncio.Task | None = None
        self._stopped = False
        self._coming_back: asyncio.Task | None = None
        ctx = ray.get_runtime_context()
        if ctx.was_current_actor_reconstructed:  # come back by itself, not at a caller's call
            ctx.current_actor.restart.remote()

    @ray.method(max_task_retries=-1)  # sent while Ray still counts this actor as restarting
    async def restart(self) -> None:
        """After a restart: listen again on the port the Controller has for this router. The
        Controller also calls it for a router that is up but not listening; it is idempotent."""
        if self._ready or self._stopped:
            return
        if self._coming_back is None or self._coming_back.done() and self._coming_back.exception():
            self._coming_back = asyncio.get_running_loop().create_task(self._listen_again())
        await asyncio.shield(self._coming_back)

    async def _listen_again(self) -> int:
        address = await self._controller.router_address.remote(name=self._name)
        port = int(address.rpartition(":")[2])
        for attempt in range(_REBIND_ATTEMPTS):
            try:
                bound = await self.start(port=port)
            except (RuntimeError, InvalidArgument):  # the dead one's socket may linger a moment
                if attempt == _REBIND_ATTEMPTS - 1:
                    log.exception("router %s could not listen again on %s", self._name, address)
                    raise
                await asyncio.sleep(_REBIND_PAUSE_S)
            else:
                log.warning("router %s restarted and listens again on %s", self._name, address)
                return bound
        raise AssertionError("unreachable")

    async def start(self, *, port: int) -> int:
        """Take every model's state from the Controller, then listen. Returns the port."""
        for name in await self._controller.model_names.remote():
            await self.install(state=await self._controller.routing_state.remote(model=name))
        loop = asyncio.get_running_loop()  # the servicer runs on the intake's loop
        inference = InferenceServicer(OnLoop(self, loop), OnLoop(self._batcher, loop).submit,
                                      self._cfg.max_request_tokens)
        servicers = [
            (inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, inference,
             inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name),
            *self._services,
        ]
        models = [self._engine.state(n).cfg for n in self._engine.model_names()]
        limits = ServerLimits(max_receive_bytes=receive_limit(self._cfg, models),
                              max_send_bytes=self._cfg.max_message_mb << 20,
                              max_concurrent_rpcs=self._cfg.max_concurrent_rpcs)
        admission = self._admission
        bound = await self._intake.start(
            servicers, self._interface, port, limits, self._tls,
            infer_refusal=self._batcher.refusal if admission is None else admission.refusal,
            infer_full=None if admission is None else admission.refused_elsewhere,
            on_tick=None if admission is None else admission.tick)
        freeze_startup_objects()
        self._trimmer = asyncio.get_running_loop().create_task(self._trim_when_idle())
        self._ready = True
        return bound

    async def _trim_when_idle(self) -> None:
        """Give memory freed after a burst back to the OS, once the batcher is idle and the
        router's own RSS (`memory()["own"]`) is over its idle level, or it served a request.

        Two things keep it otherwise: request payloads held by reference cycles (a refused
        call's exception, its traceback and the frames that hold the request; gRPC's AbortError
        makes more), which only a full collection frees; and glibc, which keeps freed memory
        in its arenas (one per thread that allocated: the intake's, the executor's, Ray's)
        until `malloc_trim`, which trims every arena and returns their free pages."""
        trim, idle, futile, served = malloc_trim(), own_rss_bytes(), 0, self._batcher.served
        while True:
            await asyncio.sleep(_TRIM_PERIOD_S * 2 ** min(futile, _TRIM_BACKOFF))
            # Refused calls are freed too, on the intake's thread and outside any request the
            # batcher saw: an RSS over the idle level is a reason as well as a served request.
            fresh = self._batcher.served != served
            if not self._batcher.idle or not (fresh or own_rss_bytes() > idle + _TRIM_SLACK_BYTES):
                continue
            served = self._batcher.served
            before = own_rss_bytes()
            gc.collect()  # on the loop: it holds the GIL throughout anyway (startup objects frozen)
            if trim is not None:
                await asyncio.to_thread(trim, 0)  # ctypes lets go of the GIL; the loop runs on
            freed = before - own_rss_bytes() >= _TRIM_SLACK_BYTES
            futile = 0 if freed or fresh else futile + 1  # memory still in use: ask less often

    async def stop(self, *, grace_s: float = 5.0) -> None:
        """Stop taking requests, let in-flight ones finish within grace_s."""
        self._ready, self._stopped = False, True
        if self._trimmer is not None:
            self._trimmer.cancel()
        await self._intake.stop(grace_s)
        await self._transport.close()

    # ---- what the Controller calls -------------------------------------------------------

    async def install(self, *, state: RoutingState) -> int:
        """Install a version (an older one than installed is ignored); the version served."""
        self._engine.install(_engine_state(state))
        self._transport.keep(h.address for n in self._engine.model_names()
                             for h in self._engine.state(n).hosts)
        return self._engine.state(state.model).version

    async def wait_drained(self, *, model: str, version: int, timeout_s: float) -> bool:
        """True once no request of `model` runs on a version older than `version`."""
        return await self._engine.wait_drained(model, version, timeout_s)

    async def take_rows(self) -> dict[str, Any]:
        """Rows per (model, layer, expert) and request latencies since the last call, and the
        version of each model installed (none while a restarted router comes back)."""
        latency = self._batcher.take_latencies()
        for model, seconds in latency.items():
            for t in seconds:
                self._metrics.observe(model, t)
        versions = {n: self._engine.state(n).version for n in self._engine.model_names()}
        return {"rows": self._engine.take_rows(), "latency_s": latency,
                "versions": versions if self._ready else None}

    def _host_gone(self, host_id: str) -> None:
        self._controller.host_gone.remote(host_id=host_id)

    # ---- what the servicer reads -----------------------------------------------------------

    def ready(self) -> bool:
        return self._ready

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def pid(self) -> int:
        return os.getpid()

    def memory(self) -> dict[str, int]:
        """This process's resident memory, split (`router.memory.memory`); its "own" part, the
        RSS less the object store's shared pages, is what `memory_bound` bounds."""
        return memory()

    def admission(self) -> dict[str, float]:
        """The door's overload control (`router.admission`): cap is inf while not engaged."""
        a = self._admission
        if a is None:
            return {}
        return {"cap": a.cap, "idle": a.idle, "busy": a.busy, "admitted_per_s": a.admitted_per_s,
                "refused_by_cap": a.refused_by_cap}

    def model_names(self) -> list[str]:
        return self._engine.model_names()

    def metadata(self, model: str) -> tuple[int, torch.dtype]:
        st = self._engine.state(model)
        return st.cfg.hidden_size, st.dtype
