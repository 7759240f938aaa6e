"""moefleet's Ray metrics (exported through Ray's Prometheus endpoint).

    moefleet_expert_tokens_per_s{model, layer, expert}   rows routed per second, last period
    moefleet_expert_replicas{model, layer, expert}       published replicas
    moefleet_host_slots_used{host} / _total{host}        slot use of each expert host
    moefleet_request_latency_s{model}                    histogram, recorded by the routers
    moefleet_routing_version{model}
    moefleet_unplaced_replicas{model}                    replicas the last plan found no slot for

The Controller records the gauges once per loop period (never per request); the routers
record one latency observation per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ray.util import metrics

__all__ = ["ControllerMetrics", "RouterMetrics", "LATENCY_BOUNDARIES_S"]

LATENCY_BOUNDARIES_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
_EXPERT = ("model", "layer", "expert")


class ControllerMetrics:
    def __init__(self):
        self._tokens = metrics.Gauge("moefleet_expert_tokens_per_s",
                                     "Rows routed to the expert per second", _EXPERT)
        self._replicas = metrics.Gauge("moefleet_expert_replicas",
                                       "Published replicas of the expert", _EXPERT)
        self._version = metrics.Gauge("moefleet_routing_version", "Routing-table version", ("model",))
        self._used = metrics.Gauge("moefleet_host_slots_used", "Slots holding an expert", ("host",))
        self._total = metrics.Gauge("moefleet_host_slots_total", "Slots of the host", ("host",))
        self._unplaced = metrics.Gauge("moefleet_unplaced_replicas",
                                       "Replicas the last plan asked for but found no slot for",
                                       ("model",))

    def record_model(self, m: Any) -> None:
        self._version.set(m.version, {"model": m.name})
        for L, e in m.keys():
            tags = {"model": m.name, "layer": str(L), "expert": str(e)}
            self._tokens.set(m.load.get((L, e), 0.0), tags)
            self._replicas.set(len(m.replicas.get((L, e), [])), tags)

    def record_unplaced(self, model: str, n: int) -> None:
        self._unplaced.set(n, {"model": model})

    def record_hosts(self, hosts: Iterable[Any]) -> None:
        for h in hosts:
            self._used.set(len(h.slots), {"host": h.id})
            self._total.set(h.slots_total, {"host": h.id})


class RouterMetrics:
    def __init__(self):
        self._latency = metrics.Histogram(
            "moefleet_request_latency_s", "Inference request latency at the router",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("model",))

    def observe(self, model: str, seconds: float) -> None:
        self._latency.observe(seconds, {"model": model})
