"""Micro-batching: merge concurrent requests for the same layer into one dispatch.

A request is sent at once when nothing is in flight for its key (no added latency when
idle). While a batch is in flight, new requests gather until the batch returns, the oldest has
waited `max_wait_s`, or `max_batch_tokens` are queued, whichever comes first.

Admission: a request is refused at once with RESOURCE_EXHAUSTED when
  * the tokens outstanding (queued or in flight, not yet answered) would pass
    `max_queue_tokens`, or
  * its key is busy and the work ahead of it (its key's queued tokens, and what is left of
    its batches in flight, at the rate that key's recent batches ran) would take longer than
    `max_queue_delay_s`.
A key's rate is measured as its throughput: the tokens that came back over the time they
took, each batch's time counted from the later of its sending and the key's last batch coming
back, so that batches in flight together count their time once. Batches summed until
`_RATE_WINDOW_S` has passed make one sample (a batch that had the key to itself is one alone):
batches in flight together often come back together, their hosts answering in one turn a
fraction of a millisecond apart, and each such gap read as a batch's time made the key look up
to 90 times faster than it ran (bench/RESULTS.md, "Overload and hostile input"). A sample is
the key's rate when every batch in it was loaded: at least half of `max_batch_tokens` itself,
or back while the key had that much work out (in flight or queued) in several batches. Many
small batches are loaded: while one is in flight the next is sent after `max_wait_s`, so under
load a key with mid-sized requests keeps many batches in flight, none of them half full, and
without their rate it would never be refused for delay. Any other sample only ever raises a known rate (the
key ran at least that fast): a few small batches, whose time is mostly fixed per-call costs,
would make the queue look slow, yet a rate measured low (at a start, in a burst) must come
back up from the lighter load its own refusals leave, or it stays low for good. A rate not
known yet is not set by them: a key that only ever has a few small batches out is never
refused for delay, and its callers wait for about one batch.
The work in flight counts as one queue at that rate, not as batches running side by side. So
under overload the excess is refused within the time it takes to look, and admitted requests
wait about `max_queue_delay_s` at most, rather than piling up in a queue. A refusal
(`Overloaded`) says how long the caller should wait before it tries again. `refusal()` asks
the same for a request not yet read (the gRPC door asks it before reading a call's payload),
counting the calls the door let in whose payloads are still on their way, even while nothing
is in flight: a burst that finds the router idle is let in up to the bound, not whole.

The batcher wraps the engine: `submit` runs the request check (`engine.check`: the model,
its layer, the hidden size) before a request is queued, and each merged batch is one
`engine.forward`. It also keeps each model's request latencies, from submit to answer, for the
Controller's poll (`take_latencies`).

Plain asyncio: knows nothing of gating, Ray or gRPC.

# T = tokens of one request, B = tokens of a merged batch, H = hidden
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moefleet.core.errors import Overloaded

__all__ = ["MicroBatcher", "BatchEngine"]


class BatchEngine(Protocol):
    """What the batcher runs requests on (`router.engine.Engine`)."""

    def check(self, model: str, layer: int, x: torch.Tensor) -> None:
        """Raise the domain error for a request that cannot be served."""

    async def forward(self, model: str, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """x: [B, H] -> (y [B, H], the routing version used)."""


_RATE_SMOOTHING = 0.3  # weight of the newest sample in a key's tokens/s estimate
_RATE_WINDOW_S = 0.05  # batches are summed over at least this long for one sample of a key's rate
_MIN_PUSHBACK_S = 0.05  # the least time a refused caller is told to wait before it retries
_LATENCY_WINDOW = 4096  # latencies kept per model between two `take_latencies`


@dataclass
class _Queue:
    items: list[tuple[torch.Tensor, asyncio.Future]] = field(default_factory=list)
    tokens: int = 0  # queued, not yet sent
    flights: list[tuple[float, int]] = field(default_factory=list)  # (sent at, tokens) per batch in flight
    tokens_per_s: float = 0.0  # this key's throughput lately, loaded (0 = not known yet)
    summed: tuple[int, float, bool] = (0, 0.0, True)  # (tokens, seconds, all loaded): not yet a sample
    timer: asyncio.TimerHandle | None = None
    done_at: float = 0.0  # when this key's last batch came back

    @property
    def in_flight(self) -> int:
        return len(self.flights)

    def wait_s(self, coming: float = 0.0) -> float:
        """How long the work ahead of a new request should take (0 when not known): the queued
        tokens and `coming` tokens more, and what is left of the batches in flight, all at the
        key's rate; the batches in flight have been worked on since the later of the oldest's
        sending and the last batch coming back."""
        rate = self.tokens_per_s
        if rate <= 0:
            return 0.0
        flights, left = tuple(self.flights), 0.0
        if flights:
            since = max(min(sent for sent, _ in flights), self.done_at)
            left = max(sum(n for _, n in flights) / rate - (time.perf_counter() - since), 0.0)
        return (self.tokens + coming) / rate + left

    def ran(self, tokens: int, seconds: float, loaded: bool, alone: bool) -> None:
        """`tokens` came back after `seconds` of the key's time; `loaded`: the batch counts
        towards a sample of the rate; `alone`: it had the key to itself, which ends the sum."""
        tokens, seconds = tokens + self.summed[0], seconds + self.summed[1]
        loaded = loaded and self.summed[2]
        if not alone and seconds < _RATE_WINDOW_S:
            self.summed = (tokens, seconds, loaded)
            return
        self.summed = (0, 0.0, True)
        rate = tokens / seconds if seconds > 0 else 0.0
        if rate > 0 and (loaded or rate > self.tokens_per_s > 0):
            self.tokens_per_s = _smoothed(self.tokens_per_s, rate)


def _smoothed(old: float, new: float) -> float:
    """`new` weighed in at `_RATE_SMOOTHING`; the first value (old = 0) taken as it is."""
    return new if old == 0 else _RATE_SMOOTHING * new + (1 - _RATE_SMOOTHING) * old


class MicroBatcher:
    def __init__(self, engine: BatchEngine, max_batch_tokens: int, max_wait_s: float,
                 max_queue_tokens: int, max_queue_delay_s: float = math.inf):
        """A batch's meta (the routing version) from `engine.forward` is handed to every
        request of the batch."""
        self._engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_tokens = max_queue_tokens
        self.max_queue_delay_s = max_queue_delay_s
        self._queues: dict[Hashable, _Queue] = {}
        self._outstanding_tokens = 0
        self.refused = 0  # requests `submit` refused: the door's check let them in a moment before
        self._outstanding_requests = 0
        self._request_tokens = 0.0  # the mean request's tokens, smoothed
        self.served = 0  # requests answered, ever
        self._latency: dict[str, list[float]] = defaultdict(list)  # model -> seconds, since taken

    @property
    def idle(self) -> bool:
        """Nothing queued or in flight."""
        return self._outstanding_tokens == 0

    async def submit(self, model: str, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """x: [T, H] -> (y [T, H], meta). Checked (`engine.check`) before it is queued."""
        self._engine.check(model, layer, x)
        t0 = time.perf_counter()
        out = await self._queued((model, layer, x.dtype), x)
        self.served += 1
        window = self._latency[model]
        if len(window) < _LATENCY_WINDOW:
            window.append(time.perf_counter() - t0)
        return out

    def take_latencies(self) -> dict[str, list[float]]:
        """Each model's request latencies (s) since the last call."""
        latency, self._latency = dict(self._latency), defaultdict(list)
        return latency

    async def _queued(self, key: Hashable, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        n = x.shape[0]
        q = self._queues.setdefault(key, _Queue())
        refusal = self._refusal(q, n)
        if refusal is not None:
            self.refused += 1
            try:
                raise refusal
            finally:  # the traceback holds this frame: without this, a cycle holding `x`
                del refusal
        fut = asyncio.get_running_loop().create_future()
        q.items.append((x, fut))
        q.tokens += n
        self._outstanding_tokens += n
        self._outstanding_requests += 1
        self._request_tokens = _smoothed(self._request_tokens, n)
        self._schedule(key, q)
        return await fut

    def refusal(self, open_calls: int = 0) -> Overloaded | None:
        """The refusal the smallest request would get now, whatever its key: for a check at the
        door, before the request is read. None while the busiest key's queue is short.
        open_calls: the calls the door has let in and not yet answered; those not yet here
        (their payload being read) count as coming to the busiest key, at the mean request's
        size, or, with no key busy, to the slowest key whose rate is known: a burst that
        finds the router idle is let in up to the bound, not whole. Safe to call from another
        thread (the gRPC intake's): it reads a copy of the queues."""
        queues = list(self._queues.values())
        coming = max(open_calls - self._outstanding_requests, 0) * self._request_tokens
        judged = [q for q in queues if q.in_flight]
        if not judged and coming:
            judged = [q for q in queues if q.tokens_per_s]
        if not judged:
            return None
        return self._refusal(max(judged, key=lambda q: q.wait_s(coming)), 1, coming)

    def _refusal(self, q: _Queue, n: int, coming: float = 0.0) -> Overloaded | None:
        """Why a request of `n` tokens for the key of `q` is refused now, or None; `coming`
        tokens more are on their way to that key."""
        if self._outstanding_tokens + coming + n > self.max_queue_tokens:
            on_way = f" and about {coming:.0f} on their way" if coming else ""
            return Overloaded(
                f"router queue is full ({self._outstanding_tokens} tokens outstanding{on_way}, "
                f"limit {self.max_queue_tokens})", max(q.wait_s(), _MIN_PUSHBACK_S))
        wait = q.wait_s(coming)
        if (q.in_flight or coming) and wait > self.max_queue_delay_s:
            return Overloaded(
                f"router is overloaded: the work queued ahead would take {wait * 1e3:.0f} ms, "
                f"over router.max_queue_delay_s ({self.max_queue_delay_s * 1e3:.0f} ms); retry later",
                max(wait - self.max_queue_delay_s, _MIN_PUSHBACK_S))
        return None

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
        flight = (time.perf_counter(), tokens)
        q.flights.append(flight)
        asyncio.get_running_loop().create_task(self._run_batch(key, q, batch, flight))
        if q.items:
            self._schedule(key, q)

    async def _run_batch(self, key: Hashable, q: _Queue, batch: list, flight: tuple[float, int]) -> None:
        live = [(x, f) for x, f in batch if not f.done()]  # drop requests already cancelled
        sent, tokens = flight
        try:
            if live:
                answered = await self._run_live(key, live)
                now = time.perf_counter()
                if answered:  # a batch that failed, often at once, says nothing of the rate
                    overlapped = q.in_flight > 1 or q.done_at > sent
                    backed_up = 2 * (sum(n for _, n in q.flights) + q.tokens) >= self.max_batch_tokens
                    q.ran(sum(x.shape[0] for x, _ in live), now - max(sent, q.done_at),
                          loaded=overlapped and backed_up or 2 * tokens >= self.max_batch_tokens,
                          alone=not overlapped)
                q.done_at = now
        finally:
            q.flights.remove(flight)
            self._outstanding_tokens -= tokens
            self._outstanding_requests -= len(batch)
            self._schedule(key, q)

    async def _run_live(self, key: Hashable, live: list) -> bool:
        """Run one batch and hand each request its rows, or the batch's error; True if answered."""
        xs = [x for x, _ in live]
        try:
            model, layer, _ = key
            x = torch.cat(xs) if len(xs) > 1 else xs[0]  # [B, H]
            y, meta = await self._engine.forward(model, layer, x)
            parts = torch.split(y, [x.shape[0] for x in xs])
            if len(parts) != len(xs) or y.shape[0] != sum(x.shape[0] for x in xs):
                raise RuntimeError(f"batch of {sum(x.shape[0] for x in xs)} rows got {y.shape[0]} back")
        except Exception as e:  # every request of the batch gets the batch's error
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(e)
            return False
        for (_, fut), part in zip(live, parts, strict=True):
            if not fut.done():
                fut.set_result((part, meta))
        return True
