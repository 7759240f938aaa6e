"""Benchmark: where the time of one small layer call goes, part by part, on the demo model.

For T=1 and T=8 tokens on `deploy/examples/tiny.yaml` (H=256, E=16, K=4, one shared expert):

    in-process parts   each step of a request timed alone, in this process, on the real code:
                       client encode, wire decode, gating, plan, gather, the host request's
                       encoding (per transport), the host's maths, combine with the shared
                       expert, wire encode, client decode
    hops               gRPC client → an actor that answers at once ("client hop"), and the same
                       actor making one call to a second actor over each transport (bench/_hop.py)
    service            the whole layer call through `moefleet` on transport=ray, then =grpc

`rest` is the service's p50 minus its bare hop (which already holds the client's and the
router's wire work and the transport) and the maths and dispatch steps: the event loop, the
micro-batcher and the Router's other bookkeeping. Medians; the machine is shared and noisy.

CPU per call: while the hops and the service are timed, each process's user + system CPU
(Linux /proc) over those calls, divided by their number: what each actor (and this client)
spends on one call, whether or not it is on the critical path. On a machine with fewer cores
than busy processes, their sum bounds the latency from below (sum / cores).

    .venv/bin/python bench/anatomy.py

# T = tokens, H = hidden, K = experts per token
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch
from _hop import EchoHost, HopFront

from moefleet.client import Client
from moefleet.cluster import service
from moefleet.cluster.model import gate_of, source_of
from moefleet.cluster.spec import load_spec
from moefleet.experts.dataplane import decode_request, encode_reply, encode_request
from moefleet.experts.host import ExpertHost, to_wire
from moefleet.protos.oip import decode_infer, encode_infer, request_for, tensor_from_response
from moefleet.router.dispatch import LayerTable, combine, plan
from moefleet.router.gating import route

DEMO = Path(__file__).resolve().parent.parent / "deploy/examples/tiny.yaml"
TOKENS = (1, 8)
LAYER = 0
# what a service call does beyond its bare hop (which already encodes, decodes and sends)
BEYOND_HOP = ("gating", "plan", "gather", "host maths (grouped SwiGLU)", "shared expert + combine")


def median_us(fn: Callable[[], object], n: int = 300) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def parts(t: int) -> dict[str, float]:
    """Each in-process step of a T-token request, µs."""
    spec = load_spec(DEMO)
    cfg, src = spec.moe, source_of(spec)
    gate = gate_of(spec, LAYER, src)
    e = cfg.n_routed_experts
    host = ExpertHost("h", e, 1, "cpu")
    for i in range(e):
        host.load_weights(slot=i, layer=LAYER, expert=i, weights=src.expert(LAYER, i))
    table = LayerTable.from_replicas({i: [(0, i)] for i in range(e)})
    shared = src.shared(LAYER)
    x = torch.randn(t, cfg.hidden_size)
    req = request_for(spec.name, LAYER, x)
    call = decode_infer(req)
    topk_w, topk_ids = route(x, gate, cfg)
    p = plan(topk_ids, table)
    rows = x[p.tokens(cfg.num_experts_per_tok)]
    b = p.batches[0]
    slots, counts = b.slot_ids.tolist(), b.counts.tolist()
    msg = encode_request(rows, b.slot_ids, b.counts)
    y = host.compute(rows, slots, counts)
    out = combine(y.clone(), p, topk_w, t, shared(x))
    resp = encode_infer(call, out, {"routing_version": 1})
    return {
        "client encode": median_us(lambda: request_for(spec.name, LAYER, x)),
        "wire decode": median_us(lambda: decode_infer(req)),
        "gating": median_us(lambda: route(x, gate, cfg)),
        "plan": median_us(lambda: plan(topk_ids, table)),
        "gather": median_us(lambda: x[p.tokens(cfg.num_experts_per_tok)]),
        "host request, ray (to_wire)": median_us(lambda: to_wire(rows)),
        "host request, grpc (encode+decode)": median_us(lambda: decode_request(
            encode_request(rows, b.slot_ids, b.counts))),
        "host maths (grouped SwiGLU)": median_us(lambda: host.compute(rows, slots, counts)),
        "host reply, grpc (encode)": median_us(lambda: encode_reply(y)),
        "shared expert + combine": median_us(lambda: combine(y.clone(), p, topk_w, t, shared(x))),
        "wire encode": median_us(lambda: encode_infer(call, out, {"routing_version": 1})),
        "client decode": median_us(lambda: tensor_from_response(resp)),
    } | {"(request bytes to host)": float(len(msg))}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(address: str, model: str, t: int, hidden: int, pids: dict[str, int],
           n: int = 300) -> tuple[float, dict[str, float]]:
    """-> (p50 µs of n calls, {process: CPU µs per call over those calls})."""
    pids = {**pids, "client": os.getpid()}
    with Client(address) as c:
        x = torch.randn(t, hidden)
        c.infer(model, LAYER, x)
        before = {k: _cpu_s(p) for k, p in pids.items()}
        p50 = median_us(lambda: c.infer(model, LAYER, x), n)
        cpu = {k: (_cpu_s(p) - before[k]) / (n + 1) * 1e6 for k, p in pids.items()}
    return p50, cpu


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))


Timings = dict[tuple[str, int], tuple[float, dict[str, float]]]  # (path, T) -> (p50, CPU)


def hops(hidden: int) -> Timings:
    """(hop, T) -> p50 µs and CPU per call of the bare hops."""
    out = {}
    for mode in ("none", "ray", "grpc"):
        echo = ray.remote(EchoHost).options(num_cpus=0.5).remote()
        front = ray.remote(HopFront).options(num_cpus=0.5, max_concurrency=100).remote(echo, mode)
        port = ray.get(front.start.remote("127.0.0.1", 0, 64 << 20))
        pids = {"front": _pid(front), "echo": _pid(echo)}
        for t in TOKENS:
            out[(mode, t)] = _timed(f"127.0.0.1:{port}", "echo", t, hidden, pids)
        ray.get(front.stop.remote())
        ray.kill(front)
        ray.kill(echo)
    return out


def services() -> Timings:
    out = {}
    for transport in ("ray", "grpc"):
        spec = load_spec(DEMO)
        spec = dataclasses.replace(spec, router=dataclasses.replace(spec.router, transport=transport))
        svc = service.start(spec, port=0)
        try:
            pids = {"router": ray.get(svc.routers[0].pid.remote())}
            for i, h in enumerate(sorted(svc.hosts.items())):
                pids[f"host {i}"] = ray.get(h[1].info.remote())["pid"]
            for t in TOKENS:
                out[(transport, t)] = _timed(svc.address, spec.name, t, spec.moe.hidden_size, pids)
        finally:
            svc.shutdown()
    return out


def main() -> None:
    torch.set_num_threads(1)
    hidden = load_spec(DEMO).moe.hidden_size
    inproc = {t: parts(t) for t in TOKENS}
    ray.init(address="local", num_cpus=6, namespace=service.NAMESPACE, include_dashboard=False,
             log_to_driver=False)
    try:
        hop_t, svc_t = hops(hidden), services()
    finally:
        ray.shutdown()
    hop = {k: v[0] for k, v in hop_t.items()}
    svc = {k: v[0] for k, v in svc_t.items()}
    print(f"| part (µs, p50) | {' | '.join(f'T={t}' for t in TOKENS)} |")
    print(f"|---|{'---:|' * len(TOKENS)}")
    for name in inproc[TOKENS[0]]:
        print(f"| {name} | {' | '.join(f'{inproc[t][name]:.0f}' for t in TOKENS)} |")
    for key, label in (("none", "client hop (gRPC → actor → reply)"),
                       ("ray", "bare hop, Ray call (client hop + one Ray call)"),
                       ("grpc", "bare hop, gRPC data plane (client hop + one gRPC call)")):
        print(f"| {label} | {' | '.join(f'{hop[(key, t)]:.0f}' for t in TOKENS)} |")
    for transport in ("ray", "grpc"):
        rest = {t: svc[(transport, t)] - hop[(transport, t)] - sum(inproc[t][k] for k in BEYOND_HOP)
                for t in TOKENS}
        print(f"| service, transport={transport} | "
              f"{' | '.join(f'{svc[(transport, t)]:.0f}' for t in TOKENS)} |")
        print(f"| rest: service − its bare hop − {' − '.join(BEYOND_HOP)} | "
              f"{' | '.join(f'{rest[t]:.0f}' for t in TOKENS)} |")
    print(f"\n| CPU per call (µs) | {' | '.join(f'T={t}' for t in TOKENS)} |")
    print(f"|---|{'---:|' * len(TOKENS)}")
    for label, timings, key in (("client hop", hop_t, "none"), ("bare hop, Ray", hop_t, "ray"),
                                ("bare hop, gRPC", hop_t, "grpc"),
                                ("service, transport=ray", svc_t, "ray"),
                                ("service, transport=grpc", svc_t, "grpc")):
        for proc in [*timings[(key, TOKENS[0])][1], "all"]:
            cells = [sum(timings[(key, t)][1].values()) if proc == "all"
                     else timings[(key, t)][1][proc] for t in TOKENS]
            print(f"| {label}: {proc} | {' | '.join(f'{c:.0f}' for c in cells)} |")


if __name__ == "__main__":
    main()
