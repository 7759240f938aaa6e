"""Benchmark: the moefleet service against its neighbours, side by side in one run.

Four paths serve one Mixtral-shaped MoE layer (H=1024, E=8, K=2, I=1408, fp32, softmax top-k
renormalised, no shared experts, random weights):

    service    the moefleet Python client → Router actor (grpc.aio) → 2 ExpertHost actors
    reference  the in-process monolithic layer (`moefleet.cluster.model.Reference`)
    bare-hop   gRPC into an actor that makes one Ray call to a second actor (returns its
               input, no maths) and replies; same protos and `router.wire` encoding
    naive      Serve's gRPC proxy → router deployment → one deployment per expert
               (`bench/_serve_naive.py`), same maths

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
import logging
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import _serve_naive
import grpc
import numpy as np
import ray
import torch

from moefleet.client import Client
from moefleet.cluster import service
from moefleet.cluster.model import Reference
from moefleet.cluster.spec import ModelSpec
from moefleet.experts.host import from_wire, to_wire
from moefleet.protos import inference_pb2_grpc
from moefleet.router.wire import decode_infer, encode_infer

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
    "router": {"num_cpus": 0.5},  # 1 torch thread
}
LAYER = 0
PATHS = ("service", "reference", "bare-hop", "naive-serve")
LATENCY_TOKENS = (1, 8, 64)
THROUGHPUT_TOKENS = 4096
REF_LAYOUTS = ((1, 2), (2, 1))  # reference throughput: (caller threads, torch threads each)
NAIVE_EXPERT_CPUS = 1.5 / 8  # the naive app also declares 2 CPUs: 8 experts + its router
NAIVE_ROUTER_CPUS = 0.5
TARGETS = {  # (label, op, bound): never lowered; a miss goes into RESULTS.md with its reason
    "hop": ("T=8 p50  service / bare-hop", "<=", 1.5),
    "naive": ("T=8 p50  naive-serve / service", ">=", 5.0),
    "tput": ("T=4096 tokens/s  service / reference", ">=", 0.8),
}


@dataclass
class Settings:
    requests: int = 200  # latency samples per path and T, after warm-up
    warmup: int = 10
    rounds: int = 4  # the samples of each path are taken in this many interleaved rounds
    duration_s: float = 12.0  # throughput: seconds per path (split over `rounds`)
    concurrency: int = 4  # throughput: caller threads per gRPC path
    ray_cpus: int = 6  # logical only: 3 actor paths × 2 declared CPUs, driven one at a time


# ---- the bare hop -------------------------------------------------------------------------


class _Echo:
    """The second actor: returns what it was sent."""

    def run(self, arr: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
        return arr, dtype


class _HopServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, echo):
        self._echo = echo

    async def ModelInfer(self, request, context):  # noqa: N802
        call = decode_infer(request)
        y, dtype = await self._echo.run.remote(*to_wire(call.x))
        return encode_infer(call, from_wire(y, dtype), {"routing_version": 0})


class _HopFront:
    """A grpc.aio server inside a Ray actor, as the Router runs it, without the router."""

    def __init__(self, echo):
        self._echo = echo
        self._server = None

    async def start(self, host: str, port: int, max_message_bytes: int) -> int:
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]
        self._server = grpc.aio.server(options=opts)
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            _HopServicer(self._echo), self._server)
        bound = self._server.add_insecure_port(f"{host}:{port}")
        await self._server.start()
        return bound

    async def stop(self) -> None:
        await self._server.stop(1.0)


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


def measure_latency(makers: dict[str, Callable[[], Infer]], s: Settings) -> dict:
    """-> {(path, T): [ms, ...]}, taken in interleaved rounds."""
    infers = {p: make() for p, make in makers.items()}
    samples: dict[tuple[str, int], list[float]] = {}
    per_round = max(1, s.requests // s.rounds)
    for t in LATENCY_TOKENS:
        x = torch.randn(t, SPEC["moe"]["hidden_size"])
        for infer in infers.values():
            time_calls_ms(infer, x, s.warmup)
        for _ in range(s.rounds):
            for p, infer in infers.items():
                samples.setdefault((p, t), []).extend(time_calls_ms(infer, x, per_round))
        print(f"  latency T={t} done", flush=True)
    return samples


def measure_throughput(makers: dict[str, Callable[[], Infer]], s: Settings) -> dict[str, float]:
    """-> {run: tokens/s at T=4096}, in interleaved rounds. The gRPC paths get `concurrency`
    caller threads; the reference runs in both layouts of the 2 cores (`REF_LAYOUTS`) and is
    credited with the better one, so it is the in-process layer at its best."""
    x = torch.randn(THROUGHPUT_TOKENS, SPEC["moe"]["hidden_size"])
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


def _check_outputs(makers: dict[str, Callable[[], Infer]], ref: Reference) -> None:
    """Every path answers: the maths paths match the reference, the bare hop echoes."""
    for t in (1, 64):
        x = torch.randn(t, SPEC["moe"]["hidden_size"])
        want = ref(LAYER, x)
        for p in ("service", "naive-serve"):
            torch.testing.assert_close(makers[p]()(x), want)
        assert torch.equal(makers["bare-hop"]()(x), x), "the bare hop changed its input"


def start_paths(spec: ModelSpec, cleanup: list[Callable[[], None]]) -> dict:
    """Start every path; each stopper is appended to `cleanup` as soon as its path exists."""
    svc = service.start(spec, port=0)
    cleanup.append(svc.shutdown)

    echo = ray.remote(_Echo).options(num_cpus=spec.hosts.num_cpus).remote()
    front = ray.remote(_HopFront).options(num_cpus=spec.router.num_cpus,
                                          max_concurrency=1000).remote(echo)
    cleanup.append(lambda: (ray.get(front.stop.remote()), ray.kill(front), ray.kill(echo)))
    hop_port = ray.get(front.start.remote("127.0.0.1", 0, spec.router.max_message_mb << 20))

    cleanup.append(_serve_naive.stop)
    naive_address = _serve_naive.start(spec, _free_port(), _free_port(), NAIVE_EXPERT_CPUS,
                                       NAIVE_ROUTER_CPUS)
    ref = Reference(spec)
    makers = {
        "service": _grpc_infer(svc.address, spec.name),
        "reference": lambda: (lambda x: ref(LAYER, x)),
        "bare-hop": _grpc_infer(f"127.0.0.1:{hop_port}", spec.name),
        "naive-serve": _grpc_infer(naive_address, spec.name),
    }
    _check_outputs(makers, ref)
    return makers


# ---- the report ---------------------------------------------------------------------------


def _ratios(lat: dict, tput: dict[str, float]) -> dict[str, float]:
    p50 = {p: float(np.percentile(lat[(p, 8)], 50)) for p in PATHS}
    return {
        "hop": p50["service"] / p50["bare-hop"],
        "naive": p50["naive-serve"] / p50["service"],
        "tput": tput["service"] / tput["reference"],
    }


def report(lat: dict, tput: dict[str, float]) -> None:
    cols = "".join(f"  T={t:<4} p50/p99 ms" for t in LATENCY_TOKENS)
    print(f"\n| {'path':<12}|{cols} | T={THROUGHPUT_TOKENS} tokens/s")
    for p in PATHS:
        cells = ""
        for t in LATENCY_TOKENS:
            q50, q99 = np.percentile(lat[(p, t)], [50, 99])
            cells += f"  {q50:7.2f} / {q99:7.2f} "
        print(f"| {p:<12}|{cells} | {tput[p]:12,.0f}")
    layouts = ", ".join(f"{c} caller(s) x {t} thread(s) {tput[f'reference {c}x{t}']:,.0f}"
                        for c, t in REF_LAYOUTS)
    print(f"(reference tokens/s is the better of: {layouts})\n")
    for key, value in _ratios(lat, tput).items():
        label, op, bound = TARGETS[key]
        ok = value <= bound if op == "<=" else value >= bound
        print(f"{label:<40} = {value:6.2f}   target {op} {bound}   {'met' if ok else 'MISSED'}")
    # Diagnostics, not targets: the part of each path's time that is not the layer's maths.
    p50 = {p: float(np.percentile(lat[(p, 8)], 50)) for p in PATHS}
    own = p50["service"] - p50["reference"]
    print("\ndiagnostics at T=8 (p50; 'overhead' = path minus the in-process reference):")
    print(f"  service overhead / bare-hop          = {own / p50['bare-hop']:6.2f}")
    if own > 0:
        naive_own = p50["naive-serve"] - p50["reference"]
        print(f"  naive overhead / service overhead    = {naive_own / own:6.2f}")


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                 if ln.startswith("Model name")), platform.processor())


def run(s: Settings) -> None:
    spec = ModelSpec.from_dict(SPEC)
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}  {_cpu_model()}  cores={torch.get_num_threads()}"
          f"  torch={torch.__version__}  ray={ray.__version__}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"settings: {s}")
    torch.manual_seed(0)
    ray.init(address="local", num_cpus=s.ray_cpus, namespace=service.NAMESPACE,
             include_dashboard=False, log_to_driver=False)
    cleanup: list[Callable[[], None]] = [ray.shutdown]
    try:
        makers = start_paths(spec, cleanup)
        print("all paths up; outputs match the reference", flush=True)
        lat = measure_latency(makers, s)
        tput = measure_throughput(makers, s)
        report(lat, tput)
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
