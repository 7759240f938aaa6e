"""Benchmark: a Ray actor call against a direct gRPC data-plane call, between the same two
actors, with the same payload, for a sweep of [T, H]: where `router.grpc_max_bytes` lies.

    caller  an async actor (as the Router is) that sends x [T, H] fp32 to the host and awaits
            an answer of the same size, by both paths, interleaved in rounds
    host    a threaded actor (as RayExpertHost is) that answers both paths with its input
            (`bench/_hop.py`'s EchoHost: the codec and secret the router uses)

No maths on either side: only what the transport costs. Prints the median of the per-round
medians for each path and their ratio; the threshold is the largest payload where gRPC still
wins. The machine is shared and noisy: only the ratios within one run mean anything.

    .venv/bin/python bench/transport.py             # the sweep (a few minutes)
    .venv/bin/python bench/transport.py --quick     # two shapes, a few seconds

# T = tokens (rows), H = hidden
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch
from _hop import SECRET, EchoHost, batch_of

from moefleet.router.transport import HostLink, Transport, call_ray

SHAPES = [(1, 1024), (8, 256), (8, 1024), (64, 1024), (256, 1024), (512, 1024), (1024, 1024),
          (2048, 1024), (4096, 1024), (8, 4096), (64, 4096), (256, 4096), (512, 4096)]
QUICK = [(8, 1024), (512, 1024)]


class Caller:
    async def sweep(self, host, address: str, secret: str, shapes: list[tuple[int, int]],
                    rounds: int, budget_s: float) -> list[dict]:
        link = HostLink(host, address, secret)
        grpc_path = Transport("grpc")
        out = []
        for t, h in shapes:
            x = torch.randn(t, h)
            b = batch_of(x)
            paths = {"ray": lambda x=x, b=b: call_ray(host, x, b),
                     "grpc": lambda x=x, b=b: grpc_path(link, x, b)}
            for fn in paths.values():  # warm up both
                await fn()
            med = {p: [] for p in paths}
            for _ in range(rounds):
                for p, fn in paths.items():
                    med[p].append(await _median_call(fn, budget_s / rounds / 2))
            out.append({"T": t, "H": h, "bytes": t * h * 4,
                        **{p: statistics.median(v) for p, v in med.items()}})
        await grpc_path.close()
        return out


async def _median_call(fn, budget_s: float, most: int = 50) -> float:
    """Median seconds of `fn` called until `budget_s` is spent (at least 3, at most `most`)."""
    times, t_end = [], time.perf_counter() + budget_s
    while len(times) < 3 or (len(times) < most and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def threshold(rows: list[dict]) -> int:
    """The largest payload (bytes) at or below which gRPC won every swept shape."""
    best = 0
    for r in sorted(rows, key=lambda r: r["bytes"]):
        if r["grpc"] > r["ray"]:
            break
        best = r["bytes"]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=4.0, help="seconds per shape and path")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    host = ray.remote(max_concurrency=1)(EchoHost).options(num_cpus=1).remote()
    caller = ray.remote(Caller).options(num_cpus=1).remote()
    address = ray.get(host.dataplane_address.remote())
    rows = ray.get(caller.sweep.remote(host, address, SECRET, QUICK if args.quick else SHAPES,
                                       args.rounds, args.budget_s))
    print(f"{'[T, H] fp32':>14} {'bytes':>10} {'Ray call ms':>12} {'gRPC ms':>9} {'gRPC/Ray':>9}")
    for r in rows:
        print(f"{str([r['T'], r['H']]):>14} {r['bytes']:>10} {r['ray'] * 1e3:>12.2f} "
              f"{r['grpc'] * 1e3:>9.2f} {r['grpc'] / r['ray']:>9.2f}")
    print(f"gRPC wins up to {threshold(rows)} bytes")
    ray.shutdown()


if __name__ == "__main__":
    main()
