"""Faults under load, for the chaos test and `bench/chaos.py`: SIGKILL an expert host, the
Router or the Controller of a running service while clients send requests, make changes in
between, and record what each fault cost.

Every process is ended by its PID, which the actor itself reports (`info()["pid"]`,
`pid()`): only processes the service under test started. Recovery is timed by polling the
service through its public API:

    host        every expert at its target replica count again, none on the killed host
    router      the router's port answers ServerReady again
    controller  Status answers again (from the restarted Controller)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import ray

from moefleet.client import Client
from moefleet.testing import VersionedReference
from tests.elastic import LoadResult, new_expert, run_load, wait_for, wrong_answers

CLIENT_DEADLINE_S = 10.0
_POLL_S = 0.05


@dataclass
class Fault:
    kind: str  # host | router | controller
    killed_at: float  # time.monotonic()
    recovered_s: float | None = None  # None: not within the wait


@dataclass
class ChaosReport:
    faults: list[Fault] = field(default_factory=list)
    result: LoadResult = field(default_factory=LoadResult)
    wrong: list[tuple[int, int]] = field(default_factory=list)

    def window(self, f: Fault, after_s: float = 0.0) -> list[float]:
        """Latencies of requests that started while fault f was being recovered from."""
        end = f.killed_at + (f.recovered_s or 0.0) + after_s
        return [s for t0, s in self.result.times if f.killed_at - s <= t0 <= end]


def kill_host(c: Client, svc: Any) -> str:
    """SIGKILL the expert host that holds the most replicas; its id."""
    (m,) = c.status().models
    counts: dict[str, int] = {}
    for layer in m.layers:
        for e in layer.experts:
            for r in e.replicas:
                counts[r.host] = counts.get(r.host, 0) + 1
    victim = max(sorted(counts), key=counts.get)
    handle = ray.get(svc.controller.hosts.remote())[victim]
    os.kill(ray.get(handle.info.remote())["pid"], signal.SIGKILL)
    return victim


def host_restored(c: Client, victim: str) -> bool:
    try:
        (m,) = c.status(timeout_s=2.0).models
    except grpc.RpcError:
        return False
    return all(len(e.replicas) == e.target_replicas and all(r.host != victim for r in e.replicas)
               for layer in m.layers for e in layer.experts)


def router_ready(address: str) -> bool:
    with Client(address, retries=0) as probe:
        try:
            return probe.ready(timeout_s=0.5)
        except grpc.RpcError:
            return False


def controller_answers(c: Client, pid_before: int, svc: Any) -> bool:
    try:
        c.status(timeout_s=2.0)
        return ray.get(svc.controller.pid.remote(), timeout=2.0) != pid_before
    except (grpc.RpcError, ray.exceptions.GetTimeoutError):
        return False


def run(svc: Any, spec: Any, threads: int = 3, max_s: float = 120.0,
        recover_s: float = 30.0) -> ChaosReport:
    """Load `svc` (serving `spec`, one replica per expert) from `threads` clients with a 10 s
    deadline while, in turn: a host is killed, an expert scaled up, the Router killed, an
    expert added, a host killed, the Controller killed, the expert removed, a host killed,
    the scaled expert scaled back. Waits for recovery after each fault."""
    ref, stop, report = VersionedReference(spec), threading.Event(), ChaosReport()
    report.result, workers = run_load(svc.address, spec, stop, threads=threads, max_requests=100_000,
                                      max_s=max_s, retries=100, timeout_s=CLIENT_DEADLINE_S)
    layer = spec.layers[-1]

    def fault(kind: str, kill, recovered) -> None:
        f = Fault(kind, time.monotonic())
        kill()
        if wait_for(recovered, recover_s, interval_s=_POLL_S):
            f.recovered_s = time.monotonic() - f.killed_at
        report.faults.append(f)
        served = n_answers()
        wait_for(lambda: n_answers() >= served + 20, 20)  # and the load goes on

    n_answers = lambda: len(report.result.answers)  # noqa: E731
    try:
        with Client(svc.address, retries=100) as c:
            wait_for(lambda: n_answers() >= 30, 60)
            victim = [""]

            def host_fault():
                fault("host", lambda: victim.__setitem__(0, kill_host(c, svc)),
                      lambda: host_restored(c, victim[0]))

            host_fault()
            c.scale_expert(spec.name, layer=layer, expert=5, replicas=2, timeout_s=60)
            router_pid = ray.get(svc.routers[0].pid.remote())
            fault("router", lambda: os.kill(router_pid, signal.SIGKILL),
                  lambda: router_ready(svc.address))
            new = new_expert(spec, seed=31, scale=3.0)
            added = spec.moe.n_routed_experts
            r = c.add_expert(spec.name, layer=layer, safetensors=new.data, expert=added, group=1,
                             timeout_s=60)
            new.record(ref, r.routing_version, layer, added, group=1)
            host_fault()
            controller_pid = ray.get(svc.controller.pid.remote())
            fault("controller", lambda: os.kill(controller_pid, signal.SIGKILL),
                  lambda: controller_answers(c, controller_pid, svc))
            r = c.remove_expert(spec.name, layer=layer, expert=added, timeout_s=60)
            ref.removed(r.routing_version, layer, added)
            host_fault()
            c.scale_expert(spec.name, layer=layer, expert=5, replicas=1, timeout_s=60)
            wait_for(lambda: n_answers() >= 20, 5)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=CLIENT_DEADLINE_S + 5)
    report.wrong = wrong_answers(report.result, ref)
    return report
