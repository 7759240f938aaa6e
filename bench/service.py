"""Benchmark: the moefleet service against its neighbours, side by side in one run.

Two models, one after the other: the demo model (`deploy/examples/tiny.yaml`: H=256, E=16,
K=4, one shared expert) and a Mixtral-shaped MoE layer (H=1024, E=8, K=2, I=1408, fp32,
softmax top-k renormalised, no shared experts). Random weights. The paths:

    service        the moefleet Python client → Router actor (grpc.aio) → 2 ExpertHost actors,
                   on the router's default transport (auto)
    reference      the in-process monolithic layer (`moefleet.testing.Reference`)
    bare-hop       gRPC into an actor that makes one Ray call to a second actor (returns its
                   input, no maths) and replies; same protos and `router.wire` encoding
    bare-hop-grpc  the same, with the one call made over the data plane (`bench/_hop.py`)
    naive-serve    Serve's gRPC proxy → router deployment → one deployment per expert
                   (`bench/_serve_naive.py`), same maths; Mixtral-shaped model only

For each: p50/p99 latency at T ∈ {1, 8, 64} (one caller, requests interleaved across paths in
rounds so the machine's noise falls on all of them alike) and throughput in tokens/s at
T=4096 (several caller threads, bounded time, also in rounds). Then the ratios the design
targets. The machine is shared and noisy: only the ratios within one run mean anything.

    .venv/bin/python bench/service.py            # the full run (a few minutes)
    .venv/bin/python bench/service.py --quick    # a smoke run (about 90 s)

# T = tokens per request, H = hidden
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _serve_naive
import numpy as np
import ray
import torch
from _hop import EchoHost, HopFront

from moefleet.client import Client
from moefleet.cluster import service
from moefleet.cluster.spec import ModelSpec, load_spec
from moefleet.testing import Reference

SPEC = {
    "name": "bench-mixtral",
    "layers": [0],
    "dtype": "float32",
    "moe": {
        "hidden_size": 1024,
        "moe_intermediate_size": 1408,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": True,
    },
    "weights": {"random": {"seed": 0}},
    # Each path declares at most the 2 physical cores; see `Settings.ray_cpus`.
    "hosts": {"count": 2, "num_cpus": 0.75, "slots": 4},  # 1 torch thread each
    "router": {"num_cpus": 0.5, "max_queue_delay_s": 30.0},  # 1 torch thread; see demo_spec
}
DEMO_SPEC = Path(__file__).resolve().parent.parent / "deploy/examples/tiny.yaml"
LAYER = 0
PATHS = ("service", "reference", "bare-hop", "bare-hop-grpc", "naive-serve")
LATENCY_TOKENS = (1, 8, 64)
THROUGHPUT_TOKENS = 4096
REF_LAYOUTS = ((1, 2), (2, 1))  # reference throughput: (caller threads, torch threads each)
NAIVE_EXPERT_CPUS = 1.5 / 8  # the naive app also declares 2 CPUs: 8 experts + its router
NAIVE_ROUTER_CPUS = 0.5
TARGETS = {  # (model, label, op, bound): never lowered; a miss goes into RESULTS.md with its reason
    "hop": ("tiny", "T=8 p50  service / bare-hop", "<=", 1.0),
    "naive": ("bench-mixtral", "T=8 p50  naive-serve / service", ">=", 5.0),
    "tput": ("bench-mixtral", "T=4096 tokens/s  service / reference", ">=", 0.8),
}


@dataclass
class Settings:
    requests: int = 200  # latency samples per path and T, after warm-up
    warmup: int = 10
    rounds: int = 4  # the samples of each path are taken in this many interleaved rounds
    duration_s: float = 12.0  # throughput: seconds per path (split over `rounds`)
    concurrency: int = 4  # throughput: caller threads per gRPC path
    ray_cpus: int = 8  # logical only: 4 actor paths × 2 declared CPUs, driven one at a time


def demo_spec(**router: object) -> ModelSpec:
    """The demo model's spec with `router` fields changed. The throughput phase's closed loop
    of callers on a shared 2-core machine can queue more than the default second of work, which
    the router refuses: this benchmark measures speed, so it raises max_queue_delay_s."""
    spec = load_spec(DEMO_SPEC)
    return dataclasses.replace(spec, router=dataclasses.replace(spec.router, **router))


# ---- measuring ----------------------------------------------------------------------------

Infer = Callable[[torch.Tensor], torch.Tensor]  # x [T, H] -> y [T, H]


def time_calls_ms(infer: Infer, x: torch.Tensor, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        infer(x)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def count_tokens(make: Callable[[], Infer], x: torch.Tensor, threads: int,
                 duration_s: float) -> tuple[int, float]:
    """Callers in `threads` threads, each with its own client, for `duration_s`:
    -> (tokens answered, seconds taken). Each caller is warmed up first, off the clock."""
    infers = [make() for _ in range(threads)]
    for infer in infers:
        infer(x)
    done = [0] * threads
    stop_at = time.perf_counter() + duration_s

    def loop(i: int) -> None:
        while time.perf_counter() < stop_at:
            infers[i](x)
            done[i] += x.shape[0]

    t0 = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done), time.perf_counter() - t0


def measure_latency(makers: dict[str, Callable[[], Infer]], s: Settings, hidden: int) -> dict:
    """-> {(path, T): [ms, ...]}, taken in interleaved rounds."""
    infers = {p: make() for p, make in makers.items()}
    samples: dict[tuple[str, int], list[float]] = {}
    per_round = max(1, s.requests // s.rounds)
    for t in LATENCY_TOKENS:
        x = torch.randn(t, hidden)
        for infer in infers.values():
            time_calls_ms(infer, x, s.warmup)
        for _ in range(s.rounds):
            for p, infer in infers.items():
                samples.setdefault((p, t), []).extend(time_calls_ms(infer, x, per_round))
        print(f"  latency T={t} done", flush=True)
    return samples


def measure_throughput(makers: dict[str, Callable[[], Infer]], s: Settings,
                       hidden: int) -> dict[str, float]:
    """-> {run: tokens/s at T=4096}, in interleaved rounds. The gRPC paths get `concurrency`
    caller threads; the reference runs in both layouts of the 2 cores (`REF_LAYOUTS`) and is
    credited with the better one, so it is the in-process layer at its best."""
    x = torch.randn(THROUGHPUT_TOKENS, hidden)
    runs = [(p, make, s.concurrency, None) for p, make in makers.items() if p != "reference"]
    runs += [(f"reference {c}x{t}", makers["reference"], c, t) for c, t in REF_LAYOUTS]
    totals = {name: [0, 0.0] for name, *_ in runs}
    default_threads = torch.get_num_threads()
    for _ in range(s.rounds):
        for name, make, callers, torch_threads in runs:
            torch.set_num_threads(torch_threads or default_threads)
            tokens, secs = count_tokens(make, x, callers, s.duration_s / s.rounds)
            totals[name][0] += tokens
            totals[name][1] += secs
    torch.set_num_threads(default_threads)
    print("  throughput done", flush=True)
    out = {name: tokens / secs for name, (tokens, secs) in totals.items()}
    out["reference"] = max(out[f"reference {c}x{t}"] for c, t in REF_LAYOUTS)
    return out


# ---- the paths ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _grpc_infer(address: str, model: str) -> Callable[[], Infer]:
    def make() -> Infer:
        client = Client(address)
        return lambda x: client.infer(model, LAYER, x)
    return make


def _check_outputs(makers: dict[str, Callable[[], Infer]], ref: Reference, hidden: int) -> None:
    """Every path answers: the maths paths match the reference, the bare hops echo."""
    for t in (1, 64):
        x = torch.randn(t, hidden)
        want = ref(LAYER, x)
        for p in ("service", "naive-serve"):
            if p in makers:
                torch.testing.assert_close(makers[p]()(x), want)
        for p in ("bare-hop", "bare-hop-grpc"):
            assert torch.equal(makers[p]()(x), x), f"{p} changed its input"


def _start_hop(spec: ModelSpec, transport: str, cleanup: list[Callable[[], None]]) -> str:
    echo = ray.remote(EchoHost).options(num_cpus=spec.hosts.num_cpus).remote()
    front = ray.remote(HopFront).options(num_cpus=spec.router.num_cpus,
                                         max_concurrency=1000).remote(echo, transport)
    cleanup.append(lambda: (ray.get(front.stop.remote()), ray.kill(front), ray.kill(echo)))
    port = ray.get(front.start.remote("127.0.0.1", 0, spec.router.max_message_mb << 20))
    return f"127.0.0.1:{port}"


def start_paths(spec: ModelSpec, naive: bool, cleanup: list[Callable[[], None]]) -> dict:
    """Start every path; each stopper is appended to `cleanup` as soon as its path exists."""
    svc = service.start(spec, port=0)
    cleanup.append(svc.shutdown)
    ref = Reference(spec)
    makers = {
        "service": _grpc_infer(svc.address, spec.name),
        "reference": lambda: (lambda x: ref(LAYER, x)),
        "bare-hop": _grpc_infer(_start_hop(spec, "ray", cleanup), spec.name),
        "bare-hop-grpc": _grpc_infer(_start_hop(spec, "grpc", cleanup), spec.name),
    }
    if naive:
        cleanup.append(_serve_naive.stop)
        makers["naive-serve"] = _grpc_infer(_serve_naive.start(
            spec, _free_port(), _free_port(), NAIVE_EXPERT_CPUS, NAIVE_ROUTER_CPUS), spec.name)
    _check_outputs(makers, ref, spec.moe.hidden_size)
    return makers


# ---- the report ---------------------------------------------------------------------------


def report(model: str, lat: dict, tput: dict[str, float]) -> None:
    paths = [p for p in PATHS if p in tput]
    cols = "".join(f"  T={t:<4} p50/p99 ms" for t in LATENCY_TOKENS)
    print(f"\n{model}\n| {'path':<14}|{cols} | T={THROUGHPUT_TOKENS} tokens/s")
    for p in paths:
        cells = ""
        for t in LATENCY_TOKENS:
            q50, q99 = np.percentile(lat[(p, t)], [50, 99])
            cells += f"  {q50:7.2f} / {q99:7.2f} "
        print(f"| {p:<14}|{cells} | {tput[p]:12,.0f}")
    layouts = ", ".join(f"{c} caller(s) x {t} thread(s) {tput[f'reference {c}x{t}']:,.0f}"
                        for c, t in REF_LAYOUTS)
    print(f"(reference tokens/s is the better of: {layouts})\n")
    p50 = {(p, t): float(np.percentile(lat[(p, t)], 50)) for p in paths for t in LATENCY_TOKENS}
    for t in LATENCY_TOKENS:
        print(f"T={t:<3} p50  service / bare-hop = {p50['service', t] / p50['bare-hop', t]:5.2f}"
              f"   service / bare-hop-grpc = {p50['service', t] / p50['bare-hop-grpc', t]:5.2f}"
              f"   service / reference = {p50['service', t] / p50['reference', t]:5.2f}")
    value = {"hop": p50["service", 8] / p50["bare-hop", 8],
             "tput": tput["service"] / tput["reference"]}
    if "naive-serve" in paths:
        value["naive"] = p50["naive-serve", 8] / p50["service", 8]
    print(f"T={THROUGHPUT_TOKENS} tokens/s  service / reference = {value['tput']:5.2f}")
    for key, (target_model, label, op, bound) in TARGETS.items():
        if target_model == model and key in value:
            ok = value[key] <= bound if op == "<=" else value[key] >= bound
            print(f"target: {label:<40} = {value[key]:6.2f}   {op} {bound}   "
                  f"{'met' if ok else 'MISSED'}")


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                 if ln.startswith("Model name")), platform.processor())


def run(s: Settings) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}  {_cpu_model()}  cores={torch.get_num_threads()}"
          f"  torch={torch.__version__}  ray={ray.__version__}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"settings: {s}")
    torch.manual_seed(0)
    ray.init(address="local", num_cpus=s.ray_cpus, namespace=service.NAMESPACE,
             include_dashboard=False, log_to_driver=False)
    try:
        for spec, naive in ((demo_spec(max_queue_delay_s=30.0), False), (ModelSpec.from_dict(SPEC), True)):
            _run_model(spec, naive, s)
    finally:
        ray.shutdown()


def _run_model(spec: ModelSpec, naive: bool, s: Settings) -> None:
    cleanup: list[Callable[[], None]] = []
    try:
        makers = start_paths(spec, naive, cleanup)
        print(f"{spec.name}: all paths up; outputs match the reference", flush=True)
        lat = measure_latency(makers, s, spec.moe.hidden_size)
        tput = measure_throughput(makers, s, spec.moe.hidden_size)
        report(spec.name, lat, tput)
    finally:
        for stop in reversed(cleanup):
            try:
                stop()
            except Exception as e:  # keep shutting the rest down
                print(f"cleanup: {type(e).__name__}: {e}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few requests, short throughput runs")
    ap.add_argument("--requests", type=int, help="latency samples per path and T")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration-s", type=float, help="throughput seconds per path")
    ap.add_argument("--concurrency", type=int, help="caller threads per gRPC path")
    a = ap.parse_args(argv)
    s = Settings(requests=40, warmup=3, rounds=2, duration_s=4.0) if a.quick else Settings()
    for name in ("requests", "warmup", "rounds", "duration_s", "concurrency"):
        if getattr(a, name) is not None:
            setattr(s, name, getattr(a, name))
    return s


if __name__ == "__main__":
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    run(parse_args())
