"""The router's Ray metric (exported through Ray's Prometheus endpoint):

    moefleet_request_latency_s{model}    histogram, one observation per request

The Controller's gauges are `moefleet.cluster.metrics`.
"""

from __future__ import annotations

from ray.util import metrics

__all__ = ["RouterMetrics"]

_LATENCY_BOUNDARIES_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


class RouterMetrics:
    def __init__(self):
        self._latency = metrics.Histogram(
            "moefleet_request_latency_s", "Inference request latency at the router",
            boundaries=_LATENCY_BOUNDARIES_S, tag_keys=("model",))

    def observe(self, model: str, seconds: float) -> None:
        self._latency.observe(seconds, {"model": model})
