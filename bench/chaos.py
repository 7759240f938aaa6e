"""Benchmark: what each fault costs, under load, on one local Ray.

Runs the chaos scenario of `tests/chaos.py` (the same one the chaos test asserts on) against
the demo model (`deploy/examples/tiny.yaml`: H=256, I=128, 16 experts, top-4, a shared
expert, 2 layers, one replica per expert on 2 hosts of 16 slots, plus `--spare` idle hosts).
Clients with a 10 s deadline send requests of 1..16 tokens while an expert host is SIGKILLed
three times, the Router once and the Controller once, with an expert scaled, added and removed
in between. For each fault it prints the time from the kill to recovered (see tests/chaos.py
for what "recovered" means per fault), the requests that started in that window, their p50 /
p99 latency, and the failures and wrong answers over the whole run.

    .venv/bin/python bench/chaos.py [--runs 3] [--spare 1] [--spec deploy/examples/tiny.yaml]

# T = tokens per request
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import ray

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))  # the repo root, for tests.*

from moefleet.cluster import service  # noqa: E402
from moefleet.cluster.spec import load_spec  # noqa: E402
from tests import chaos  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--spare", type=int, default=1, help="hosts.spare")
    ap.add_argument("--threads", type=int, default=3, help="client threads")
    ap.add_argument("--spec", default=str(_ROOT / "deploy/examples/tiny.yaml"))
    args = ap.parse_args()
    ray.init(address="local", num_cpus=4, namespace=service.NAMESPACE, include_dashboard=False,
             log_to_driver=False)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, ray {ray.__version__}")
    print("| run | fault | kill → recovered s | requests in window | p50 ms | p99 ms |")
    print("|---|---|---:|---:|---:|---:|")
    totals = []
    for run in range(args.runs):
        spec = load_spec(args.spec)
        spec.hosts = dataclasses.replace(spec.hosts, spare=args.spare, max_count=8)
        with tempfile.TemporaryDirectory() as state:
            svc = service.start(spec, port=0, state_dir=state)
            try:
                report = chaos.run(svc, spec, threads=args.threads, max_s=150)
            finally:
                svc.shutdown()
        for f in report.faults:
            lat = sorted(report.window(f))
            p50 = statistics.median(lat) * 1e3 if lat else float("nan")
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 if lat else float("nan")
            took = "not recovered" if f.recovered_s is None else f"{f.recovered_s:.2f}"
            print(f"| {run + 1} | {f.kind} | {took} | {len(lat)} | {p50:.1f} | {p99:.1f} |")
        r = report.result
        totals.append((len(r.answers), len(r.errors), len(report.wrong)))
    for run, (answers, errors, wrong) in enumerate(totals):
        print(f"run {run + 1}: {answers} answers, {errors} failed, {wrong} wrong")
    ray.shutdown()


if __name__ == "__main__":
    main()
