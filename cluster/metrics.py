"""moefleet's Ray metrics (exported through Ray's Prometheus endpoint).

    moefleet_expert_tokens_per_s{model, layer, expert}   rows routed per second, last period
    moefleet_expert_replicas{model, layer, expert}       published replicas
    moefleet_host_slots_used{host} / _total{host}        slot use of each expert host
    moefleet_routing_version{model}
    moefleet_unplaced_replicas{model}                    replicas the last plan found no slot for

The Controller records them once per loop period (never per request). The routers' request
latency histogram is `moefleet.router.metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ray.util import metrics

__all__ = ["ControllerMetrics"]

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
            self._tokens.set(m.tokens_per_s.get((L, e), 0.0), tags)
            self._replicas.set(len(m.replicas.get((L, e), [])), tags)

    def record_unplaced(self, model: str, n: int) -> None:
        self._unplaced.set(n, {"model": model})

    def record_hosts(self, hosts: Iterable[Any]) -> None:
        for h in hosts:
            self._used.set(len(h.slots), {"host": h.id})
            self._total.set(h.slots_total, {"host": h.id})
