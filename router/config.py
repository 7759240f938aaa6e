"""The router's settings: the `router:` section of a model spec, field for field.

Plain data: no torch, no Ray, no grpc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moefleet.core.config import require

__all__ = ["RouterConfig"]


@dataclass
class RouterConfig:
    max_batch_tokens: int = 8192  # micro-batcher: merge at most this many tokens per dispatch
    max_wait_ms: float = 1.0  # ... and wait at most this long for more requests
    max_queue_tokens: int = 262144  # tokens queued or in flight; beyond it, RESOURCE_EXHAUSTED
    max_queue_delay_s: float = 0.1  # refuse a request whose queue ahead would take longer (s)
    min_idle_cpu: float = 0.08  # overloaded with less CPU idle than this: cap calls admitted/s (0: never)
    max_request_tokens: int = 65536
    max_message_mb: int = 256  # gRPC send limit; the receive limit is derived (see actor.py)
    max_concurrent_rpcs: int = 128  # more ModelInfer calls open at once are refused on arrival
    transport: str = "auto"  # router -> hosts: "grpc", "ray", or "auto" (gRPC up to grpc_max_bytes)
    grpc_max_bytes: int = 2 << 20  # auto: a host's rows up to this size go over gRPC (bench/transport.py)
    num_cpus: float = 1
    num_gpus: float = 0  # a router with a GPU computes the gating there
    nodes_resource: str = ""  # besides the head's, a router on every node offering this resource
    start_timeout_s: float = 60.0  # how long a router may wait for a node before giving up
    restore_wait_s: float = 5.0  # rows of an expert whose last replica died wait this long for it

    def __post_init__(self):
        require(self.max_batch_tokens >= 1, "router.max_batch_tokens must be >= 1")
        require(self.start_timeout_s > 0, "router.start_timeout_s must be > 0")
        require(self.max_wait_ms >= 0, "router.max_wait_ms must be >= 0")
        require(self.max_queue_delay_s > 0, "router.max_queue_delay_s must be > 0")
        require(0 <= self.min_idle_cpu < 1, "router.min_idle_cpu must be in [0, 1)")
        require(0 <= self.restore_wait_s < math.inf, "router.restore_wait_s must be >= 0 and finite")
        for name in ("max_queue_tokens", "max_request_tokens", "max_message_mb", "max_concurrent_rpcs"):
            require(getattr(self, name) >= 1, f"router.{name} must be >= 1")
        require(self.transport in ("auto", "grpc", "ray"), "router.transport must be auto, grpc or ray")
        require(self.grpc_max_bytes >= 0, "router.grpc_max_bytes must be >= 0")
