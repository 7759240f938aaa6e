"""The router's gRPC intake: its server runs on a thread and event loop of its own.

grpc.aio takes in each new call through its event loop, a few loop turns a call. On the loop
that also runs the engine, a busy loop took calls in slower than an overload brought them, and
they waited unseen inside gRPC, for seconds, before the door (`servicer.CallSlots`, the
batcher's check) could refuse them. On a loop of its own the door sees each call as it
arrives (bench/RESULTS.md, "Overload and hostile input").

A timer on the intake's loop ticks `on_tick` (the router's `Admission`, which admits fewer
calls while the machine's CPU is saturated), on the same thread as the door it controls.

The engine stays on the actor's loop. `OnLoop` carries the servicers' calls there: a
coroutine method runs on the actor's loop, a plain one (a read of the router's state) is
called directly.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .servicer import ServerLimits, TlsConfig, serve_grpc

__all__ = ["Intake", "OnLoop"]

log = logging.getLogger(__name__)

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

    async def start(self, servicers: list[tuple[Callable[[Any, Any], None], Any, str]], host: str,
                    port: int, limits: ServerLimits, tls: TlsConfig | None = None,
                    infer_refusal: Callable[[int], Any] | None = None,
                    on_tick: Callable[[], None] | None = None) -> int:
        """Listen; returns the bound port. On failure the intake's thread is ended too.
        on_tick() is called on the intake's thread every `_TICK_S` while it listens."""
        try:
            self._server, bound, _ = await self._on_intake(
                serve_grpc(servicers, host, port, limits, tls, infer_refusal))
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
