"""Micro-batching: merge concurrent requests for the same layer into one dispatch.

A request is sent at once when nothing is in flight for its key (no added latency when
idle). While a batch is in flight, new requests gather until the batch returns, the oldest has
waited `max_wait_s`, or `max_batch_tokens` are queued, whichever comes first. Past
`max_queue_tokens` outstanding (queued or in flight, not yet answered), requests are refused
with RESOURCE_EXHAUSTED: the router's admission limit.

Plain asyncio: knows nothing of gating, Ray or gRPC.

# T = tokens of one request, B = tokens of a merged batch, H = hidden
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ResourceExhausted

__all__ = ["MicroBatcher"]

RunBatch = Callable[[Hashable, torch.Tensor], Awaitable[tuple[torch.Tensor, Any]]]


@dataclass
class _Queue:
    items: list[tuple[torch.Tensor, asyncio.Future]] = field(default_factory=list)
    tokens: int = 0
    in_flight: int = 0
    timer: asyncio.TimerHandle | None = None


class MicroBatcher:
    def __init__(self, run: RunBatch, max_batch_tokens: int, max_wait_s: float, max_queue_tokens: int):
        """run(key, x [B, H]) -> (y [B, H], meta); meta (e.g. the routing version) is handed
        to every request of the batch."""
        self._run = run
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_tokens = max_queue_tokens
        self._queues: dict[Hashable, _Queue] = {}
        self._outstanding_tokens = 0

    async def submit(self, key: Hashable, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """x: [T, H] -> (y [T, H], meta)."""
        n = x.shape[0]
        if self._outstanding_tokens + n > self.max_queue_tokens:
            raise ResourceExhausted(
                f"router queue is full ({self._outstanding_tokens} tokens outstanding, "
                f"limit {self.max_queue_tokens})")
        q = self._queues.setdefault(key, _Queue())
        fut = asyncio.get_running_loop().create_future()
        q.items.append((x, fut))
        q.tokens += n
        self._outstanding_tokens += n
        self._schedule(key, q)
        return await fut

    def _schedule(self, key: Hashable, q: _Queue) -> None:
        if not q.items:
            return
        if q.in_flight == 0 or q.tokens >= self.max_batch_tokens or self.max_wait_s == 0:
            self._flush(key, q)
        elif q.timer is None:
            q.timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._flush, key, q)

    def _flush(self, key: Hashable, q: _Queue) -> None:
        if q.timer is not None:
            q.timer.cancel()
            q.timer = None
        batch, tokens = [], 0
        while q.items and (not batch or tokens + q.items[0][0].shape[0] <= self.max_batch_tokens):
            x, fut = q.items.pop(0)
            batch.append((x, fut))
            tokens += x.shape[0]
        q.tokens -= tokens
        q.in_flight += 1
        asyncio.get_running_loop().create_task(self._run_batch(key, q, batch, tokens))
        if q.items:
            self._schedule(key, q)

    async def _run_batch(self, key: Hashable, q: _Queue, batch: list, tokens: int) -> None:
        live = [(x, f) for x, f in batch if not f.done()]  # drop requests already cancelled
        try:
            if live:
                await self._run_live(key, live)
        finally:
            q.in_flight -= 1
            self._outstanding_tokens -= tokens
            self._schedule(key, q)

    async def _run_live(self, key: Hashable, live: list) -> None:
        xs = [x for x, _ in live]
        try:
            y, meta = await self._run(key, torch.cat(xs) if len(xs) > 1 else xs[0])  # [B, H]
            parts = torch.split(y, [x.shape[0] for x in xs])
            if len(parts) != len(xs) or y.shape[0] != sum(x.shape[0] for x in xs):
                raise RuntimeError(f"batch of {sum(x.shape[0] for x in xs)} rows got {y.shape[0]} back")
        except Exception as e:  # every request of the batch gets the batch's error
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, fut), part in zip(live, parts, strict=True):
            if not fut.done():
                fut.set_result((part, meta))
