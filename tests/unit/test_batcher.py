"""router/batcher.py: concurrent requests for a layer share one dispatch, each gets back exactly
its own rows, and the batcher's bounds (tokens, wait, queue) hold.

Each test drives the batcher from `asyncio.run`. The fake `run` records every batch it is
handed and can be held open on an event, which is how a batch is kept "in flight" while
followers arrive. Its output is a fixed row-wise function of its input (2x + 1), so a request
that got another request's rows, or its own rows in the wrong order, shows up in the values.

# T = tokens of one request, B = tokens of a merged batch, H = hidden
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Hashable

import pytest
import torch

from moefleet.core.errors import ResourceExhausted
from moefleet.router import batcher
from moefleet.router.batcher import MicroBatcher

pytestmark = pytest.mark.unit

H = 4
TIMEOUT_S = 5.0  # a broken batcher fails the test instead of hanging the run


def _f(x: torch.Tensor) -> torch.Tensor:
    return 2 * x + 1


class FakeRun:
    """run(key, x) -> (2x + 1, call number). Calls listed in `hold` wait for `release`."""

    def __init__(self, hold: tuple[int, ...] = (), fail: tuple[int, ...] = ()):
        self.calls: list[tuple[Hashable, torch.Tensor, float]] = []  # (key, x, loop time)
        self.release = asyncio.Event()
        self.hold, self.fail = hold, fail

    async def __call__(self, key: Hashable, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        self.calls.append((key, x.clone(), asyncio.get_running_loop().time()))
        n = len(self.calls)
        if n in self.hold:
            await self.release.wait()
        if n in self.fail:
            raise RuntimeError(f"boom in call {n}")
        return _f(x), n

    def sizes(self) -> list[int]:
        return [x.shape[0] for _, x, _ in self.calls]

    async def started(self, n: int) -> None:
        while len(self.calls) < n:
            await asyncio.sleep(0)


class _engine:  # noqa: N801 (reads as a function at its call sites)
    """`run(model, x)` as the engine the batcher wraps: every request passes the check."""

    def __init__(self, run):
        self.run = run

    def check(self, model: str, layer: int, x: torch.Tensor) -> None:
        pass

    async def forward(self, model: str, layer: int, x: torch.Tensor):
        return await self.run(model, x)


def _xs(sizes: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, H, generator=g) for t in sizes]


def _run(coro) -> None:
    async def bounded():
        await asyncio.wait_for(coro, TIMEOUT_S)

    asyncio.run(bounded())


async def _settle(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _behind_a_held_batch(b: MicroBatcher, run, xs: list) -> list[asyncio.Task]:
    """Submit xs[0], wait until its batch is in flight (held), then submit the rest."""
    first = asyncio.create_task(b.submit("L0", 0, xs[0]))
    await run.started(1)
    rest = [asyncio.create_task(b.submit("L0", 0, x)) for x in xs[1:]]
    await _settle()
    return [first, *rest]


def _assert_each_got_its_own_rows(xs: list, results: list) -> None:
    for x, (y, _) in zip(xs, results, strict=True):
        torch.testing.assert_close(y, _f(x))


# ---- merging -------------------------------------------------------------------------------


def test_requests_arriving_during_a_batch_are_merged_into_one_call() -> None:
    async def main():
        run = FakeRun(hold=(1,))
        b = MicroBatcher(_engine(run), max_batch_tokens=1000, max_wait_s=60.0, max_queue_tokens=10_000)
        xs = _xs([3, 1, 4, 2], seed=1)
        tasks = await _behind_a_held_batch(b, run, xs)
        assert run.sizes() == [3], "followers wait while the first batch is in flight"
        run.release.set()
        results = await asyncio.gather(*tasks)
        assert run.sizes() == [3, 7]
        torch.testing.assert_close(run.calls[1][1], torch.cat(xs[1:]))  # in arrival order
        for x, (y, meta), want_meta in zip(xs, results, [1, 2, 2, 2], strict=True):
            torch.testing.assert_close(y, _f(x))
            assert meta == want_meta

    _run(main())


def test_many_concurrent_requests_each_get_exactly_their_own_rows() -> None:
    async def main():
        run = FakeRun()
        b = MicroBatcher(_engine(run), max_batch_tokens=64, max_wait_s=0.005, max_queue_tokens=10_000)
        sizes = [1, 5, 2, 7, 3, 1, 8, 4, 6, 2] * 4
        xs = _xs(sizes, seed=2)
        results = await asyncio.gather(*(b.submit("L0", 0, x) for x in xs))
        _assert_each_got_its_own_rows(xs, results)
        assert len(run.calls) < len(xs), "concurrent requests should share calls"
        assert sum(run.sizes()) == sum(sizes)

    _run(main())


def test_different_keys_never_share_a_call() -> None:
    async def main():
        run = FakeRun(hold=(1, 2))
        b = MicroBatcher(_engine(run), max_batch_tokens=1000, max_wait_s=60.0, max_queue_tokens=10_000)
        xa, xb = _xs([2, 3, 1], seed=3), _xs([4, 1, 2], seed=4)
        tasks = [asyncio.create_task(b.submit("a", 0, xa[0])),
                 asyncio.create_task(b.submit("b", 0, xb[0]))]
        await run.started(2)
        tasks += [asyncio.create_task(b.submit(k, 0, x)) for k, xs in (("a", xa), ("b", xb))
                  for x in xs[1:]]
        await _settle()
        run.release.set()
        results = await asyncio.gather(*tasks)
        for x, (y, _) in zip([xa[0], xb[0], *xa[1:], *xb[1:]], results, strict=True):
            torch.testing.assert_close(y, _f(x))
        by_key = {}
        for key, x, _ in run.calls:
            by_key.setdefault(key, []).append(x.shape[0])
        assert by_key == {"a": [2, 4], "b": [4, 3]}
        merged = {key: x for key, x, _ in run.calls[2:]}
        torch.testing.assert_close(merged["a"], torch.cat(xa[1:]))
        torch.testing.assert_close(merged["b"], torch.cat(xb[1:]))

    _run(main())


# ---- bounds --------------------------------------------------------------------------------


def test_a_merged_batch_never_exceeds_max_batch_tokens() -> None:
    async def main():
        run = FakeRun(hold=(1,))
        b = MicroBatcher(_engine(run), max_batch_tokens=8, max_wait_s=60.0, max_queue_tokens=10_000)
        xs = _xs([2, 3, 3, 3, 5, 2, 1, 4, 4, 6, 1], seed=5)
        tasks = await _behind_a_held_batch(b, run, xs)
        run.release.set()
        results = await asyncio.gather(*tasks)
        assert max(run.sizes()) <= 8
        assert sum(run.sizes()) == sum(x.shape[0] for x in xs)
        _assert_each_got_its_own_rows(xs, results)

    _run(main())


def test_a_single_oversize_request_is_dispatched_alone() -> None:
    async def main():
        run = FakeRun(hold=(1,))
        b = MicroBatcher(_engine(run), max_batch_tokens=8, max_wait_s=60.0, max_queue_tokens=10_000)
        xs = _xs([2, 3, 20, 3], seed=6)
        tasks = await _behind_a_held_batch(b, run, xs)
        run.release.set()
        results = await asyncio.gather(*tasks)
        assert 20 in run.sizes()
        assert all(n <= 8 for n in run.sizes() if n != 20)
        _assert_each_got_its_own_rows(xs, results)

    _run(main())


def test_followers_filling_max_batch_tokens_are_dispatched_without_waiting() -> None:
    async def main():
        run = FakeRun(hold=(1,))  # the first batch never returns during the test
        b = MicroBatcher(_engine(run), max_batch_tokens=8, max_wait_s=60.0, max_queue_tokens=10_000)
        xs = _xs([2, 5, 3], seed=12)
        first = asyncio.create_task(b.submit("L0", 0, xs[0]))
        await run.started(1)
        results = await asyncio.wait_for(
            asyncio.gather(*(b.submit("L0", 0, x) for x in xs[1:])), 1.0  # 5 + 3 = 8 queued
        )
        assert run.sizes() == [2, 8] and not first.done()
        for x, (y, meta) in zip(xs[1:], results, strict=True):
            torch.testing.assert_close(y, _f(x))
            assert meta == 2
        run.release.set()
        await first

    _run(main())


def test_an_idle_request_is_dispatched_at_once() -> None:
    async def main():
        run = FakeRun()
        b = MicroBatcher(_engine(run), max_batch_tokens=1000, max_wait_s=60.0, max_queue_tokens=10_000)
        (x,) = _xs([5], seed=7)
        y, meta = await asyncio.wait_for(b.submit("L0", 0, x), 1.0)  # far below max_wait_s
        torch.testing.assert_close(y, _f(x))
        assert (meta, run.sizes()) == (1, [5])

    _run(main())


def test_a_lone_follower_waits_about_max_wait_not_for_the_batch_in_flight() -> None:
    async def main():
        run = FakeRun(hold=(1,))  # the first batch never returns during the test
        b = MicroBatcher(_engine(run), max_batch_tokens=1000, max_wait_s=0.05, max_queue_tokens=10_000)
        xs = _xs([3, 2], seed=8)
        first = asyncio.create_task(b.submit("L0", 0, xs[0]))
        await run.started(1)
        t0 = asyncio.get_running_loop().time()
        y, meta = await asyncio.wait_for(b.submit("L0", 0, xs[1]), 1.0)
        waited = run.calls[1][2] - t0
        assert 0.04 <= waited <= 0.5, waited
        torch.testing.assert_close(y, _f(xs[1]))
        assert meta == 2 and not first.done()
        run.release.set()
        torch.testing.assert_close((await first)[0], _f(xs[0]))

    _run(main())


def test_a_full_queue_raises_resource_exhausted_and_later_requests_succeed() -> None:
    async def main():
        run = FakeRun(hold=(1,))
        b = MicroBatcher(_engine(run), max_batch_tokens=1000, max_wait_s=60.0, max_queue_tokens=10)
        xs = _xs([4, 6, 5, 3], seed=9)
        first = asyncio.create_task(b.submit("L0", 0, xs[0]))  # in flight: not queued
        await run.started(1)
        queued = asyncio.create_task(b.submit("L0", 0, xs[1]))  # 6 queued
        await _settle()
        with pytest.raises(ResourceExhausted) as err:
            await b.submit("L0", 0, xs[2])  # 6 + 5 > 10
        assert err.value.code == "RESOURCE_EXHAUSTED"
        run.release.set()
        for x, task in ((xs[0], first), (xs[1], queued)):
            torch.testing.assert_close((await task)[0], _f(x))
        y, _ = await b.submit("L0", 0, xs[3])  # the queue has drained: answered again
        torch.testing.assert_close(y, _f(xs[3]))
        assert 5 not in run.sizes()

    _run(main())


# ---- errors --------------------------------------------------------------------------------


def test_an_error_in_run_reaches_every_request_of_its_batch_and_the_batcher_recovers() -> None:
    async def main():
        run = FakeRun(hold=(1,), fail=(2,))
        b = MicroBatcher(_engine(run), max_batch_tokens=1000, max_wait_s=60.0, max_queue_tokens=10_000)
        xs = _xs([2, 3, 1, 4, 5], seed=10)
        first = asyncio.create_task(b.submit("L0", 0, xs[0]))
        await run.started(1)
        merged = [asyncio.create_task(b.submit("L0", 0, x)) for x in xs[1:4]]
        await _settle()
        run.release.set()
        torch.testing.assert_close((await first)[0], _f(xs[0]))
        errors = await asyncio.gather(*merged, return_exceptions=True)
        assert run.sizes()[:2] == [2, 8]
        assert all(isinstance(e, RuntimeError) and "boom in call 2" in str(e) for e in errors)
        y, meta = await b.submit("L0", 0, xs[4])
        torch.testing.assert_close(y, _f(xs[4]))
        assert meta == 3

    _run(main())


def test_run_returning_the_wrong_number_of_rows_fails_every_request_instead_of_hanging() -> None:
    async def main():
        async def short(key, x):
            return _f(x)[:-1], 0

        b = MicroBatcher(_engine(short), max_batch_tokens=1000, max_wait_s=0.01, max_queue_tokens=10_000)
        xs = _xs([2, 3], seed=11)
        results = await asyncio.wait_for(
            asyncio.gather(*(b.submit("L0", 0, x) for x in xs), return_exceptions=True), 1.0
        )
        assert all(isinstance(r, Exception) for r in results)

    _run(main())


class SlowRun:
    """run(key, x) -> (2x + 1, None), taking `s_per_token` seconds a token (awaited sleep)."""

    def __init__(self, s_per_token: float):
        self.s_per_token = s_per_token

    async def __call__(self, key: Hashable, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        await asyncio.sleep(x.shape[0] * self.s_per_token)
        return _f(x), None


def test_work_ahead_longer_than_max_queue_delay_is_refused_at_once_and_admitted_work_is_served() -> None:
    # 1 ms a token: a request of 10 tokens takes 10 ms; at most 30 ms may wait ahead of one
    async def main():
        b = MicroBatcher(_engine(SlowRun(1e-3)), max_batch_tokens=20, max_wait_s=0.0,
                         max_queue_tokens=10**6, max_queue_delay_s=0.03)
        (x,) = _xs([10], seed=0)
        await b.submit("k", 0, x)  # measures the key's rate: about 10k tokens/s
        tasks = [asyncio.create_task(b.submit("k", 0, x)) for _ in range(20)]
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT_S)
        refused = [r for r in done if isinstance(r, ResourceExhausted)]
        served = [r for r in done if not isinstance(r, BaseException)]
        for y, _ in served:
            torch.testing.assert_close(y, _f(x))
        assert "max_queue_delay_s" in str(refused[0])
        assert len(served) + len(refused) == 20
        # the first one goes at once; each later one is admitted while <= 30 ms are ahead (a
        # busy machine measures a slower rate, so fewer may be)
        assert 1 <= len(served) <= 6, len(served)
        y, _ = await b.submit("k", 0, x)  # once drained, requests are admitted again
        torch.testing.assert_close(y, _f(x))
        assert b.idle

    asyncio.run(main())


def test_the_work_ahead_counts_what_is_left_of_the_batches_in_flight_as_one_queue(monkeypatch) -> None:
    # 100 tokens/s. At t = 10.0: 20 tokens queued (0.2 s); batches of 50 (sent at 9.7) and 10
    # (sent at 9.5) in flight: 0.6 s of work, worked on since 9.5, so 0.1 s is left.
    q = batcher._Queue(tokens=20, flights=[(9.7, 50), (9.5, 10)], tokens_per_s=100.0)
    monkeypatch.setattr(batcher.time, "perf_counter", lambda: 10.0)
    assert q.in_flight == 2
    assert q.wait_s() == pytest.approx(0.2 + 0.1)
    assert q.wait_s(coming=30) == pytest.approx(0.5 + 0.1)  # 30 tokens more on their way
    q.done_at = 9.8  # a batch came back at 9.8: the ones still out were worked on since then
    assert q.wait_s() == pytest.approx(0.2 + 0.4)
    q.flights = [(5.0, 10)]  # overdue: nothing left, not less
    assert q.wait_s() == pytest.approx(0.2)
    q.flights.clear()
    assert q.wait_s() == pytest.approx(0.2)
    assert batcher._Queue(tokens=20).wait_s() == 0.0  # rate not known yet


def test_a_refused_request_is_freed_at_once_not_at_the_next_collection() -> None:
    # A refusal's traceback holds submit's frame, which holds the request: if the frame also
    # held the refusal, the payload would wait in a reference cycle for a full collection.
    async def main():
        b = MicroBatcher(_engine(FakeRun()), max_batch_tokens=8, max_wait_s=60.0, max_queue_tokens=4)
        x = torch.randn(8, 4)
        alive = weakref.ref(x)
        with pytest.raises(ResourceExhausted):
            await b.submit("k", 0, x)
        del x
        return alive

    gc.disable()
    try:
        assert asyncio.run(main())() is None
    finally:
        gc.enable()


def test_a_few_small_batches_at_once_are_never_measured_nor_refused_for_delay() -> None:
    async def main():
        b = MicroBatcher(_engine(SerialRun(1e-3)), max_batch_tokens=1000, max_wait_s=0.0,
                         max_queue_tokens=10**6, max_queue_delay_s=1e-6)
        for seed in range(3):  # four callers at once, 5 to 16 tokens each: never 500 out
            xs = _xs([5, 16, 9, 12], seed=seed)
            got = await asyncio.wait_for(asyncio.gather(*(b.submit("k", 0, x) for x in xs)), TIMEOUT_S)
            for (y, _), x in zip(got, xs, strict=True):
                torch.testing.assert_close(y, _f(x))
        assert b.refusal() is None

    asyncio.run(main())


def test_a_key_whose_small_batches_run_one_at_a_time_is_never_refused_for_delay() -> None:
    async def main():
        b = MicroBatcher(_engine(SlowRun(1e-3)), max_batch_tokens=1000, max_wait_s=0.0,
                         max_queue_tokens=10**6, max_queue_delay_s=1e-6)
        for seed in range(3):  # batches of 5 to 20 tokens, never two at once: never measured
            for x in _xs([5, 20, 10], seed=seed):
                y, _ = await asyncio.wait_for(b.submit("k", 0, x), TIMEOUT_S)
                torch.testing.assert_close(y, _f(x))
            assert b.refusal() is None

    asyncio.run(main())


class SerialRun(SlowRun):
    """As SlowRun, but one batch at a time, as a host's kernel runs them."""

    def __init__(self, s_per_token: float):
        super().__init__(s_per_token)
        self.lock = asyncio.Lock()

    async def __call__(self, key: Hashable, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        async with self.lock:
            return await super().__call__(key, x)


def test_small_batches_that_overlap_are_measured_and_refused_once_they_back_up() -> None:
    # Each request is sent as its own batch at once (max_wait_s=0) and the batches run one
    # after another, 5 ms each: each a quarter of half of max_batch_tokens, yet they queue up.
    # Their rate is known once 50 ms of them came back (`_RATE_WINDOW_S`).
    async def main():
        b = MicroBatcher(_engine(SerialRun(1e-3)), max_batch_tokens=40, max_wait_s=0.0,
                         max_queue_tokens=10**6, max_queue_delay_s=0.03)
        xs = _xs([5] * 100, seed=5)
        tasks = []
        for x in xs:  # one request a millisecond; they take 5 ms each
            tasks.append(asyncio.create_task(b.submit("k", 0, x)))
            await asyncio.sleep(1e-3)
        got = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT_S)
        refused = [r for r in got if isinstance(r, ResourceExhausted)]
        assert refused and all("max_queue_delay_s" in str(r) for r in refused)
        served = [(x, r) for x, r in zip(xs, got, strict=True) if not isinstance(r, BaseException)]
        assert len(served) + len(refused) == len(xs) and served
        for x, (y, _) in served:
            torch.testing.assert_close(y, _f(x))

    asyncio.run(main())


class BurstRun(SerialRun):
    """As SerialRun, but the results come back `burst` at a time, as hosts that answer several
    batches in one turn of the router's loop: a fraction of a millisecond apart."""

    def __init__(self, s_per_token: float, burst: int):
        super().__init__(s_per_token)
        self.burst, self.waiting = burst, []

    async def __call__(self, key: Hashable, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = await super().__call__(key, x)
        back = asyncio.Event()
        self.waiting.append(back)
        if len(self.waiting) == self.burst:
            for event in self.waiting:
                event.set()
            self.waiting.clear()
        await back.wait()
        return out


def test_batches_that_come_back_together_are_measured_at_the_rate_they_ran() -> None:
    # 40 batches of 10 tokens run one after another, 5 ms each (2000 tokens/s), and come back
    # four at a time. Taken one by one, three of every four came back no time after the last.
    async def main():
        b = MicroBatcher(_engine(BurstRun(0.5e-3, burst=4)), max_batch_tokens=40,
                         max_wait_s=0.0, max_queue_tokens=10**6)
        xs = _xs([10] * 40, seed=6)
        got = await asyncio.wait_for(asyncio.gather(*(b.submit("k", 0, x) for x in xs)), TIMEOUT_S)
        for (y, _), x in zip(got, xs, strict=True):
            torch.testing.assert_close(y, _f(x))
        (q,) = b._queues.values()
        # slower than 2000 on a busy machine (each sleep runs over), never much faster
        assert 0.4 * 2000 <= q.tokens_per_s <= 1.5 * 2000, q.tokens_per_s

    asyncio.run(main())


def test_a_sample_is_the_rate_only_when_every_batch_in_it_was_loaded() -> None:
    q = batcher._Queue(tokens_per_s=100.0)
    q.ran(10, 0.5, loaded=False, alone=True)  # 20 tokens/s: mostly fixed costs, says nothing
    assert q.tokens_per_s == 100.0
    q.ran(10, 0.01, loaded=False, alone=True)  # 1000 tokens/s: at least that fast
    assert q.tokens_per_s == pytest.approx(0.3 * 1000 + 0.7 * 100)
    q = batcher._Queue(tokens_per_s=100.0)
    q.ran(2, 0.03, loaded=True, alone=False)  # summed: under _RATE_WINDOW_S so far
    assert q.tokens_per_s == 100.0
    q.ran(1, 0.03, loaded=True, alone=False)  # 3 tokens in 60 ms: a sample, and a lower rate
    assert q.tokens_per_s == pytest.approx(0.3 * 50 + 0.7 * 100)
    q.ran(1, 0.03, loaded=True, alone=False)
    q.ran(1, 0.03, loaded=False, alone=False)  # one batch not loaded: it may only raise the rate
    assert q.tokens_per_s == pytest.approx(0.3 * 50 + 0.7 * 100)
    unknown = batcher._Queue()
    unknown.ran(10, 0.01, loaded=False, alone=True)
    assert unknown.tokens_per_s == 0.0  # not known stays not known: small batches never set it
    unknown.ran(10, 0.01, loaded=True, alone=True)
    assert unknown.tokens_per_s == pytest.approx(1000.0)  # the first sample is taken as it is


def test_a_rate_measured_low_recovers_from_lone_small_batches_and_stops_refusing() -> None:
    # A key's rate measured far too low (as a start-up burst can) refuses a second caller at
    # once; the lone small batches it still serves raise the rate until both are admitted.
    async def main():
        b = MicroBatcher(_engine(SlowRun(1e-3)), max_batch_tokens=20, max_wait_s=0.0,
                         max_queue_tokens=10**6, max_queue_delay_s=0.03)
        x, y = _xs([4, 4], seed=7)  # small: 2 x 4 < 20, never a sample of their own
        await b.submit("k", 0, _xs([10], seed=8)[0])  # a whole sample: about 1000 tokens/s
        (q,) = b._queues.values()
        q.tokens_per_s = 20.0  # one 4-token batch in flight: 200 ms ahead, over the 30 ms bound

        async def pair() -> list:
            return await asyncio.wait_for(asyncio.gather(b.submit("k", 0, x), b.submit("k", 0, y),
                                                         return_exceptions=True), TIMEOUT_S)

        assert any(isinstance(r, ResourceExhausted) for r in await pair())
        for _ in range(10):
            await b.submit("k", 0, x)  # alone: 4 tokens in about 4 ms
        assert not any(isinstance(r, BaseException) for r in await pair())

    asyncio.run(main())


def test_the_door_check_refuses_while_any_key_has_too_much_work_ahead_and_not_after(monkeypatch) -> None:
    async def main():
        b = MicroBatcher(_engine(SlowRun(1e-3)), max_batch_tokens=20, max_wait_s=0.0,
                         max_queue_tokens=10**6, max_queue_delay_s=0.03)
        (x,) = _xs([10], seed=1)
        assert b.refusal() is None  # idle
        await b.submit("k", 0, x)  # measures the key's rate
        assert b.refusal() is None  # nothing in flight
        # The clock stops, so the batches sent from here on have run for no time at all and
        # each counts whole: the door refuses once more than 30 ms of them are in flight.
        now = batcher.time.perf_counter()
        monkeypatch.setattr(batcher.time, "perf_counter", lambda: now)
        tasks = []
        while b.refusal() is None and len(tasks) < 10:
            tasks.append(asyncio.create_task(b.submit("k", 0, x)))
            await _settle()
        refusal = b.refusal()
        assert refusal is not None and "max_queue_delay_s" in str(refusal)
        assert refusal.retry_after_s >= 0.05 and len(tasks) < 10
        await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)  # every one admitted is served
        assert b.refusal() is None and b.idle

    asyncio.run(main())


def test_the_door_check_counts_open_calls_not_yet_queued_as_work_on_its_way(monkeypatch) -> None:
    async def main():
        b = MicroBatcher(_engine(SlowRun(1e-3)), max_batch_tokens=20, max_wait_s=0.0,
                         max_queue_tokens=10**6, max_queue_delay_s=0.03)
        (x,) = _xs([10], seed=3)
        await b.submit("k", 0, x)  # measures the key's rate and the mean request (10 tokens)
        now = batcher.time.perf_counter()
        monkeypatch.setattr(batcher.time, "perf_counter", lambda: now)
        task = asyncio.create_task(b.submit("k", 0, x))  # one in flight, whole: under 30 ms
        await _settle()
        assert b.refusal(open_calls=1) is None  # the one open call is the one in flight
        # Calls the door let in whose payload is still being read: each brings a mean request
        # (10 tokens, about 10 ms at this key's rate), so ten more pass the 30 ms bound.
        ahead = b.refusal(open_calls=1 + 10)
        assert ahead is not None and "max_queue_delay_s" in str(ahead)
        await asyncio.wait_for(task, TIMEOUT_S)

    asyncio.run(main())


class FailsSmall(SlowRun):
    """As SlowRun, but a batch of under 5 tokens fails at once, as on a host already gone."""

    async def __call__(self, key: Hashable, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        if x.shape[0] < 5:
            raise RuntimeError("host gone")
        return await super().__call__(key, x)


def test_a_batch_that_failed_at_once_does_not_raise_the_rate() -> None:
    async def main():
        b = MicroBatcher(_engine(FailsSmall(1e-3)), max_batch_tokens=20, max_wait_s=0.0,
                         max_queue_tokens=10**6, max_queue_delay_s=0.03)
        await b.submit("k", 0, _xs([10], seed=10)[0])  # a whole sample: about 1000 tokens/s
        (q,) = b._queues.values()
        measured = q.tokens_per_s
        for x in _xs([4, 4, 4], seed=11):  # alone and small: had they run, at least this fast
            with pytest.raises(RuntimeError):
                await b.submit("k", 0, x)
        assert q.tokens_per_s == measured and b.idle

    asyncio.run(main())


def test_a_burst_that_finds_the_router_idle_is_let_in_up_to_the_bound_not_whole() -> None:
    async def main():
        b = MicroBatcher(_engine(SlowRun(1e-3)), max_batch_tokens=20, max_wait_s=0.0,
                         max_queue_tokens=10**6, max_queue_delay_s=0.03)
        assert b.refusal(open_calls=100) is None  # no rate known yet: nothing to judge by
        (x,) = _xs([10], seed=9)
        await b.submit("k", 0, x)  # measures the key's rate (about 1000 tokens/s) and the mean request
        assert b.idle and b.refusal() is None
        # nothing in flight, but calls let in whose payloads are on their way: 10 tokens each,
        # about 10 ms at this key's rate (slower on a busy machine, so never more than 3 fit)
        assert b.refusal(open_calls=1) is None
        refused = b.refusal(open_calls=4)
        assert refused is not None and "max_queue_delay_s" in str(refused)

    asyncio.run(main())


def test_the_door_check_counts_open_calls_not_yet_queued_against_a_full_queue() -> None:
    async def main():
        run = FakeRun(hold=(1,))
        b = MicroBatcher(_engine(run), max_batch_tokens=1000, max_wait_s=60.0, max_queue_tokens=25)
        first = asyncio.create_task(b.submit("L0", 0, _xs([10], seed=4)[0]))
        await run.started(1)
        assert b.refusal(open_calls=2) is None  # 10 outstanding + 10 coming + 1 <= 25
        assert "queue is full" in str(b.refusal(open_calls=3))  # 10 + 20 coming + 1 > 25
        run.release.set()
        await first

    _run(main())


def test_the_door_check_refuses_a_full_queue() -> None:
    async def main():
        run = FakeRun(hold=(1,))
        b = MicroBatcher(_engine(run), max_batch_tokens=1000, max_wait_s=60.0, max_queue_tokens=4)
        first = asyncio.create_task(b.submit("L0", 0, _xs([4], seed=2)[0]))
        await run.started(1)
        assert "queue is full" in str(b.refusal())
        run.release.set()
        await first
        assert b.refusal() is None

    _run(main())
