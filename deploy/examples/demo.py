"""The moefleet demo: serve deploy/examples/tiny.yaml on an embedded local Ray, send traffic
with the Python client, check every answer against the in-process reference, print latency
and throughput; then change the service while traffic flows (scale an expert, add one,
remove it) and check that no request was lost or wrong; shut down.

    python deploy/examples/demo.py [SPEC] [--requests N]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch

from moefleet.client import Client
from moefleet.cluster import service
from moefleet.cluster.spec import load_spec
from moefleet.testing import Reference, VersionedReference, expert_file, random_expert

HERE = Path(__file__).resolve().parent


def main() -> None:
    args = _parse()
    spec = load_spec(args.spec)
    print(f"starting moefleet for {spec.name!r}: {len(spec.layers)} layers × "
          f"{spec.moe.n_routed_experts} experts (top-{spec.moe.num_experts_per_tok}, "
          f"{spec.moe.topk_method}), {spec.hosts.count} hosts, embedded local Ray")
    t0 = time.perf_counter()
    service.connect_ray("local")
    svc = service.start(spec, port=0)
    print(f"serving on {svc.address} after {time.perf_counter() - t0:.1f}s")
    try:
        with Client(svc.address) as client:
            check(client, spec, Reference(spec))
            latency(client, spec, args.requests)
            throughput(client, spec)
            elasticity(client, spec)
    finally:
        svc.shutdown()
        ray.shutdown()
        print("shut down cleanly")


def check(client: Client, spec, ref: Reference) -> None:
    worst = 0.0
    for layer in spec.layers:
        for tokens in (1, 7, 64, 512):
            x = torch.randn(tokens, spec.moe.hidden_size)
            y, version = client.infer_with_version(spec.name, layer, x)
            want = ref(layer, x)
            torch.testing.assert_close(y, want)
            worst = max(worst, (y - want).abs().max().item())
    print(f"check: every answer equals the in-process reference (max |diff| {worst:.2e}, "
          f"routing version {version})")


def latency(client: Client, spec, requests: int) -> None:
    print(f"{'tokens':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for tokens in (1, 8, 64):
        x = torch.randn(tokens, spec.moe.hidden_size)
        times = []
        for _ in range(requests):
            t = time.perf_counter()
            client.infer(spec.name, spec.layers[0], x)
            times.append((time.perf_counter() - t) * 1e3)
        q = statistics.quantiles(times, n=100)
        print(f"{tokens:>7} {q[49]:>8.2f} {q[98]:>8.2f}")


def throughput(client: Client, spec, tokens: int = 4096, seconds: float = 3.0) -> None:
    x = torch.randn(tokens, spec.moe.hidden_size)

    def worker(_):
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            client.infer(spec.name, spec.layers[0], x)
            n += tokens
        return n

    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(worker, range(4)))
    print(f"throughput at T={tokens}, 4 clients: {total / (time.perf_counter() - t):,.0f} tokens/s")


def elasticity(client: Client, spec) -> None:
    """While 2 threads keep sending requests: scale expert 0 of the first layer to 2 replicas,
    add a new expert, remove it, scale back. Every answer is checked against the reference of
    the routing version it reports."""
    layer, h = spec.layers[0], spec.moe.hidden_size
    ref, stop, lock = VersionedReference(spec), threading.Event(), threading.Lock()
    answers: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    failed = [0]

    def traffic(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        while not stop.is_set():
            x = torch.randn(8, h, generator=g)
            try:
                y, version = client.infer_with_version(spec.name, layer, x)
            except Exception:
                failed[0] += 1
                continue
            with lock:
                answers.append((x, y, version))

    workers = [threading.Thread(target=traffic, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    try:
        r = client.scale_expert(spec.name, layer=layer, expert=0, replicas=2)
        print(f"elasticity: expert 0 of layer {layer} has 2 replicas from version {r.routing_version}")
        row, bias, new = random_expert(spec, seed=99, gate_scale=2.0)  # tokens pick it often
        grouped = spec.moe.group_limited
        r = client.add_expert(spec.name, layer=layer, safetensors=expert_file(row, new, bias),
                              group=0 if grouped else None)
        ref.added(r.routing_version, layer, r.expert, row, new, bias, group=0)
        print(f"elasticity: added expert {r.expert} to layer {layer} (version {r.routing_version})")
        time.sleep(1.0)
        r = client.remove_expert(spec.name, layer=layer, expert=r.expert)
        ref.removed(r.routing_version, layer, r.expert)
        print(f"elasticity: removed it again (version {r.routing_version})")
        client.scale_expert(spec.name, layer=layer, expert=0, replicas=1)
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join()
    wrong = 0
    for x, y, version in answers:
        wrong += not torch.allclose(y, ref(version, layer, x), rtol=1.3e-6, atol=1e-5)
    versions = sorted({v for *_, v in answers})
    print(f"elasticity: {len(answers) + failed[0]} requests over routing versions "
          f"{versions[0]}..{versions[-1]}: {failed[0]} failed, {wrong} wrong")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", nargs="?", default=str(HERE / "tiny.yaml"))
    p.add_argument("--requests", type=int, default=200, help="requests per latency row")
    return p.parse_args()


if __name__ == "__main__":
    main()
