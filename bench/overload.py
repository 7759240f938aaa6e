"""Benchmark: the service under 10× overload, against its own unloaded figures, in one run.

Serves `deploy/examples/tiny.yaml` on an embedded local Ray and measures, with T=512 requests:

    unloaded   one caller after another: p50 / p99 latency
    sustained  the rate a closed loop of callers gets (requests/s)
    overload   an open loop offering `--factor` × the sustained rate for `--seconds`: how many
               were admitted and refused (RESOURCE_EXHAUSTED), any other status, admitted
               p50 / p99, how fast a refusal came back, health checks during it
    memory     the Router's RSS idle, at its peak during the overload, and after it; and its
               own part, without RssShmem (the Ray object store's pages it has mapped: the
               store's memory, shared), split into RssAnon / RssFile / RssShmem

and prints admitted p99 / unloaded p99 (the target is <= 3) and the refusal p99 (<= 50 ms).
Requests are serialised once and sent as bytes, so the load generator stays cheap; every
admitted answer is checked against the in-process reference.

    .venv/bin/python bench/overload.py [--factor 10 | --rate R] [--seconds 10] [--intermediate-size I]
        [--router max_concurrent_rpcs=16 max_queue_delay_s=0.1]

`--intermediate-size` overrides the experts' size: with large experts the expert hosts are
what saturates; with the demo's own (128) it is the router's intake of calls.

# T = tokens per request, H = hidden
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import ray
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moefleet.cluster import service
from moefleet.cluster.spec import load_spec
from moefleet.protos import inference_pb2 as pb
from moefleet.protos.oip import request_for, tensor_from_response
from moefleet.router.memory import memory
from moefleet.testing import Reference

INFER = "/inference.GRPCInferenceService/ModelInfer"
SPEC = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "tiny.yaml"
T = 512
DEADLINE_S = 10.0


@dataclass
class Tally:
    ok_s: list[float] = field(default_factory=list)  # latency of each admitted request
    ok_at: list[float] = field(default_factory=list)  # when each admitted request was sent
    refused_s: list[float] = field(default_factory=list)  # time to each RESOURCE_EXHAUSTED
    refused_at: list[float] = field(default_factory=list)  # when each refused call was sent
    other: dict[str, int] = field(default_factory=dict)
    refused_by: dict[str, int] = field(default_factory=dict)  # which check refused, by its message
    wrong: int = 0


_REASONS = (("calls open", "slots"), ("calls/s", "cap"), ("would take", "queue delay"),
            ("queue is full", "queue full"))


def _why_refused(details: str) -> str:
    """Which of the door's checks a RESOURCE_EXHAUSTED came from, by its message."""
    return next((why for words, why in _REASONS if words in details), "other")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Load:
    """Pre-serialised requests and the answers they must get."""

    def __init__(self, spec, n: int = 8):
        ref = Reference(spec)
        g = torch.Generator().manual_seed(0)
        self.xs = [torch.randn(T, spec.moe.hidden_size, generator=g) for _ in range(n)]
        self.data = [request_for(spec.name, 0, x).SerializeToString() for x in self.xs]
        self.want = [ref(0, x) for x in self.xs]

    async def one(self, call, i: int, tally: Tally, check: bool) -> float:
        """Send request i; returns the pushback of a refusal (s), else 0."""
        t0 = time.perf_counter()
        try:
            raw = await call(self.data[i % len(self.data)], timeout=DEADLINE_S)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                tally.refused_s.append(time.perf_counter() - t0)
                tally.refused_at.append(t0)
                why = _why_refused(e.details() or "")
                tally.refused_by[why] = tally.refused_by.get(why, 0) + 1
                trailers = dict(e.trailing_metadata() or ())
                return int(trailers.get("grpc-retry-pushback-ms", 0)) / 1e3
            tally.other[e.code().name] = tally.other.get(e.code().name, 0) + 1
            return 0.0
        tally.ok_s.append(time.perf_counter() - t0)
        tally.ok_at.append(t0)
        if check:
            y = tensor_from_response(pb.ModelInferResponse.FromString(raw))
            if not torch.allclose(y, self.want[i % len(self.want)], rtol=1e-4, atol=1e-4):
                tally.wrong += 1
        return 0.0


async def unloaded(call, load: Load, seconds: float) -> Tally:
    tally, end, i = Tally(), time.monotonic() + seconds, 0
    while time.monotonic() < end:
        await load.one(call, i, tally, check=True)
        i += 1
    return tally


async def closed_loop(call, load: Load, callers: int, seconds: float) -> tuple[float, float]:
    """(requests/s, refusals/s) that `callers` back-to-back callers get; a refused caller waits
    out the pushback, as gRPC's own retries would."""
    tally, end = Tally(), time.monotonic() + seconds

    async def caller(c: int) -> None:
        i = c
        while time.monotonic() < end:
            await asyncio.sleep(await load.one(call, i, tally, check=False))
            i += callers
    t0 = time.monotonic()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    took = time.monotonic() - t0
    return len(tally.ok_s) / took, len(tally.refused_s) / took


async def open_loop(call, load: Load, rate: float, seconds: float) -> Tally:
    """Offer `rate` requests/s whatever comes back, for `seconds`."""
    tally, tasks, n = Tally(), [], int(rate * seconds)
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(load.one(call, i, tally, check=i % 5 == 0)))
    await asyncio.gather(*tasks)
    return tally


async def watch(channel, router, pid: int, stop: asyncio.Event, period_s: float = 0.25
                ) -> tuple[int, list[float], int, int, list[dict]]:
    """(health checks SERVING within 1 s, each check's time, peak Router RSS, peak of its own
    part, the router's admission state at each check) until `stop`."""
    health = health_pb2_grpc.HealthStub(channel)
    serving, times, peak, peak_own, admission = 0, [], 0, 0, []
    while not stop.is_set():
        admission.append(await router.admission.remote())
        t0 = time.perf_counter()
        try:
            r = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            serving += r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            pass
        times.append(time.perf_counter() - t0)
        m = memory(pid)
        peak, peak_own = max(peak, m["rss"]), max(peak_own, m["own"])
        await asyncio.sleep(period_s)
    return serving, times, peak, peak_own, admission


async def run(address: str, router, spec, factor: float, seconds: float, fixed_rate: float | None) -> None:
    load = Load(spec)
    pid = await router.pid.remote()  # the embedded Ray runs the Router on this machine
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER)
        await unloaded(call, load, 1.0)  # warm up
        idle = memory(pid)
        base = await unloaded(call, load, 4.0)
        rate, refused = await closed_loop(call, load, callers=8, seconds=5.0)
        print(f"closed loop   {refused:.1f} refusals/s")
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(channel, router, pid, stop))
        offered = fixed_rate or factor * rate
        over = await open_loop(call, load, offered, seconds)
        stop.set()
        serving, checks, peak_rss, peak_own, admission = await watcher
        after = []
        for wait_s in (5.0, 10.0):  # 5 s and 15 s after
            await asyncio.sleep(wait_s)
            after.append(memory(pid))
    _report(spec, base, rate, offered, over, serving, checks, idle, peak_rss, peak_own, after)
    _report_admission(admission)


def _report_admission(trace: list[dict]) -> None:
    """The door's cap, the machine's idle CPU share and the router's cores, every 0.25 s of
    the overload."""
    if not trace or not trace[0]:
        print("admission     no cap (router.min_idle_cpu = 0)")
        return
    caps = " ".join("-" if math.isinf(a["cap"]) else f"{a['cap']:.0f}" for a in trace)
    idle = " ".join(f"{a['idle']:.2f}" for a in trace)
    busy = " ".join(f"{a['busy']:.2f}" for a in trace)
    print(f"admission     {trace[-1]['refused_by_cap']} refused by the cap; cap (calls/s, - = none) "
          f"every 0.25 s: {caps}")
    print(f"              idle CPU share (smoothed) every 0.25 s: {idle}")
    print(f"              router's cores (smoothed) every 0.25 s: {busy}")


def _report(spec, base: Tally, rate: float, offered_rate: float, over: Tally, serving: int,
            checks: list[float], idle: dict[str, int], peak_rss: int, peak_own: int,
            after: list[dict[str, int]]) -> None:
    mib = 1 << 20
    idle_rss, after_rss = idle["rss"], [m["rss"] for m in after]
    offered = len(over.ok_s) + len(over.refused_s) + sum(over.other.values())
    print(f"# bench/overload.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
          f"{platform.node()}  T={T}, deploy/examples/tiny.yaml, I={spec.moe.moe_intermediate_size}")
    print(f"unloaded      p50 {_pct(base.ok_s, 0.5) * 1e3:7.1f} ms   "
          f"p99 {_pct(base.ok_s, 0.99) * 1e3:7.1f} ms   ({len(base.ok_s)} requests, wrong {base.wrong})")
    print(f"sustained     {rate:7.1f} requests/s (8 callers, closed loop)")
    print(f"offered       {offered_rate:7.1f} requests/s ({offered_rate / rate:.1f}x) for {offered} requests")
    print(f"admitted      {len(over.ok_s):7d}   p50 {_pct(over.ok_s, 0.5) * 1e3:7.1f} ms   "
          f"p99 {_pct(over.ok_s, 0.99) * 1e3:7.1f} ms   wrong {over.wrong}")
    print(f"refused       {len(over.refused_s):7d}   RESOURCE_EXHAUSTED after p50 "
          f"{_pct(over.refused_s, 0.5) * 1e3:.1f} ms, p99 {_pct(over.refused_s, 0.99) * 1e3:.1f} ms")
    print(f"other         {over.other or 'none'}")
    print(f"refused by    {over.refused_by or 'none'}")
    start = min(over.refused_at + over.ok_at, default=0.0)
    for what, at, took in (("refusal", over.refused_at, over.refused_s),
                           ("admitted", over.ok_at, over.ok_s)):
        by_s: dict[int, list[float]] = {}
        for sent, t in zip(at, took, strict=True):
            by_s.setdefault(int(sent - start), []).append(t)
        if by_s:
            print(f"              {what} p99 by second sent (ms): "
                  + " ".join(f"{_pct(v, 0.99) * 1e3:.0f}" for _, v in sorted(by_s.items())))
    print(f"health        {serving}/{len(checks)} checks SERVING within 1 s during the overload, "
          f"p50 {_pct(checks, 0.5) * 1e3:.1f} ms, max {max(checks or [0]) * 1e3:.0f} ms")
    print(f"router RSS    idle {idle_rss / mib:.0f} MiB, peak {peak_rss / mib:.0f} MiB, "
          + ", ".join(f"{s} s after {r / mib:.0f} MiB (+{(r - idle_rss) / mib:.0f} MiB)"
                      for s, r in zip((5, 15), after_rss, strict=True)))
    print(f"router own    idle {idle['own'] / mib:.0f} MiB, peak {peak_own / mib:.0f} MiB, "
          + ", ".join(f"{s} s after {m['own'] / mib:.0f} MiB (+{(m['own'] - idle['own']) / mib:.0f} MiB)"
                      for s, m in zip((5, 15), after, strict=True))
          + "  (RSS less RssShmem)")
    split = (f"{label} {idle[k] / mib:.0f} -> {after[-1][k] / mib:.0f} MiB"
             for label, k in (("RssAnon", "anon"), ("RssFile", "file"), ("RssShmem", "shmem")))
    print(f"router split  {', '.join(split)} (idle -> 15 s after)")
    ratio = _pct(over.ok_s, 0.99) / _pct(base.ok_s, 0.99)
    print(f"ratio         admitted p99 / unloaded p99 = {ratio:.2f} (target <= 3); "
          f"refusal p99 {_pct(over.refused_s, 0.99) * 1e3:.1f} ms (target <= 50)")
    print(f"              median admitted / unloaded p50 = "
          f"{statistics.median(over.ok_s or [0]) / _pct(base.ok_s, 0.5):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factor", type=float, default=10.0, help="offered load / sustained rate")
    ap.add_argument("--rate", type=float, default=None,
                    help="offer this many requests/s instead of --factor x the sustained rate")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long the overload lasts")
    ap.add_argument("--intermediate-size", type=int, default=None, help="the experts' size")
    ap.add_argument("--router", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="router settings over the spec's, e.g. max_concurrent_rpcs=16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = load_spec(str(SPEC))
    if args.intermediate_size:
        spec.moe = dataclasses.replace(spec.moe, moe_intermediate_size=args.intermediate_size)
    overrides = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.router)}
    spec.router = dataclasses.replace(spec.router, **overrides)
    print(f"router settings: {overrides or 'as in the spec'}")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             namespace=service.NAMESPACE)
    svc = service.start(spec, port=0, host="127.0.0.1")
    try:
        asyncio.run(run(svc.address, svc.routers[0], spec, args.factor, args.seconds, args.rate))
    finally:
        svc.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
