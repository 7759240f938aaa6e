"""The simulator's scenario: a YAML/JSON file that maps one to one onto these dataclasses.

Plain data with documented defaults; `load_scenario` checks each field's type and range and
names the field in its error (`SpecError`, via the model spec's own `build`). It does not know
how load is generated, what a period costs, or what the policies do.

    name: small
    duration_s: 3600                       # simulated time
    slo_s: 0.05                            # p99 layer-latency budget
    model: {layers: 4, n_routed_experts: 16, num_experts_per_tok: 2, hidden_size: 64, ...}
    hosts: {count: 4, max_count: 8, slots: 16}
    cost: {tflops: 0.05, hbm_gbps: 10, ...}        # the cost model (sim/cost.py)
    load: {tokens_per_s: 4000, gini: [0.1, 0.4], ...}  # or load: {trace: FILE.csv}
    autoscaling: {target_tokens_per_s: 2000, period_s: 1, ...}  # the model spec's block
    policies: [{name: static, kind: static}, {name: moefleet, kind: autoscale}, ...]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moefleet.cluster.autoscale import AutoscalingConfig
from moefleet.core.config import SpecError, build, require  # the model spec's field checks

__all__ = ["ModelShape", "FleetConfig", "CostConfig", "LoadConfig", "PolicyConfig", "Scenario",
           "load_scenario", "POLICY_KINDS", "SpecError"]

POLICY_KINDS = ("static", "replan", "autoscale")
POPULARITY = ("lognormal", "zipf")


@dataclass
class ModelShape:
    """The MoE layers' shape (HF config.json names) and the bytes per weight (1 = FP8, 2 = BF16)."""

    layers: int = 4
    n_routed_experts: int = 16
    num_experts_per_tok: int = 2
    hidden_size: int = 64
    moe_intermediate_size: int = 48
    bytes_per_param: float = 4.0

    def __post_init__(self):
        for name in ("layers", "n_routed_experts", "num_experts_per_tok", "hidden_size",
                     "moe_intermediate_size"):
            require(getattr(self, name) >= 1, f"model.{name} must be >= 1")
        require(self.num_experts_per_tok <= self.n_routed_experts,
               "model.num_experts_per_tok must be <= n_routed_experts")
        require(self.bytes_per_param > 0, "model.bytes_per_param must be > 0")

    @property
    def expert_bytes(self) -> float:
        """One SwiGLU expert's weights: w1, w3 [I, H] and w2 [H, I]."""
        return 3.0 * self.hidden_size * self.moe_intermediate_size * self.bytes_per_param

    @property
    def flops_per_row(self) -> float:
        """Three [H, I] matmuls per token row, 2 FLOPs per multiply-add."""
        return 6.0 * self.hidden_size * self.moe_intermediate_size


@dataclass
class FleetConfig:
    """Like the model spec's `hosts:` block: start with `count`, scale up to `max_count`."""

    count: int = 4
    max_count: int = 0  # 0 means 2 × count
    slots: int = 16

    def __post_init__(self):
        require(self.count >= 1 and self.slots >= 1, "hosts.count and hosts.slots must be >= 1")
        self.max_count = self.max_count or 2 * self.count
        require(self.max_count >= self.count, "hosts.max_count must be >= hosts.count")


@dataclass
class CostConfig:
    """The cost model's parameters (sim/cost.py). The defaults describe this repository's 2-core
    development VM serving float32 experts: `call_overhead_s` (to the hot expert's rows/s) and
    `net_latency_s` (to the light p50) are fitted by bench/sim_calibrate.py (bench/RESULTS.md),
    the micro-batcher's defaults are the router's, `load_gbps` is bench/load.py's figure, and
    `tflops`, `hbm_gbps` and `net_gbps` are nominal (tiny experts never reach them there)."""

    tflops: float = 0.02  # per host: matmul throughput, TFLOP/s
    hbm_gbps: float = 5.0  # per host: weight-read bandwidth, GB/s
    call_overhead_s: float = 3.7e-3  # per host call (one layer's rows on one host)
    net_latency_s: float = 5e-3  # router <-> host round trip, plus the router's own work
    net_gbps: float = 1.0  # router <-> host bandwidth, both ways together
    activation_bytes: float = 4.0  # bytes per hidden-state element on the wire
    load_gbps: float = 1.0  # weight loading into a slot (the slot serves nothing meanwhile)
    batch_tokens: int = 16  # tokens per request: one client's call of one layer
    max_batch_tokens: int = 8192  # the router's micro-batcher (router.max_batch_tokens) merges
    max_wait_ms: float = 1.0  # requests for up to this long (router.max_wait_ms); 0: never

    def __post_init__(self):
        for name in ("tflops", "hbm_gbps", "net_gbps", "activation_bytes", "load_gbps"):
            require(getattr(self, name) > 0, f"cost.{name} must be > 0")
        for name in ("call_overhead_s", "net_latency_s"):
            require(getattr(self, name) >= 0, f"cost.{name} must be >= 0")
        require(self.batch_tokens >= 1 and self.max_batch_tokens >= 1,
               "cost.batch_tokens and cost.max_batch_tokens must be >= 1")
        require(self.max_wait_ms >= 0, "cost.max_wait_ms must be >= 0")


@dataclass
class LoadConfig:
    """Generated load (the fields below `trace`), or a replayed `trace` file (sim/load.py)."""

    trace: str = ""  # CSV or Parquet; when given, the generator's fields are ignored
    tokens_per_s: float = 1000.0  # peak tokens/s into each layer (each picks top-k experts)
    trough_ratio: float = 0.4  # the diurnal curve's lowest rate, as a share of the peak
    peak_hour: float = 14.0  # hour of the day (0-24) of the peak; t = 0 is midnight
    popularity: str = "lognormal"  # or "zipf": the shape of one layer's expert popularity
    gini: list[float] = field(default_factory=lambda: [0.1, 0.4])  # per-layer target, [lo, hi]
    drift_hours: float = 6.0  # popularity drifts through a full change of order in this time
    shifts_per_hour: float = 0.0  # abrupt domain shifts: the hot set changes at once
    bursts_per_hour: float = 0.0  # bursts: the rate is multiplied by burst_factor for burst_s
    burst_factor: float = 2.0
    burst_s: float = 30.0
    poisson: bool = True  # measured counts are Poisson samples (False: the expected rate)
    seed: int = 0

    def __post_init__(self):
        require(self.tokens_per_s >= 0, "load.tokens_per_s must be >= 0")
        require(0 <= self.trough_ratio <= 1, "load.trough_ratio must be in [0, 1]")
        require(self.popularity in POPULARITY, f"load.popularity must be one of {POPULARITY}")
        require(isinstance(self.gini, list) and len(self.gini) == 2
               and all(isinstance(g, (int, float)) and 0 <= g < 1 for g in self.gini)
               and self.gini[0] <= self.gini[1], "load.gini must be [lo, hi] with 0 <= lo <= hi < 1")
        for name in ("drift_hours", "shifts_per_hour", "bursts_per_hour", "burst_s"):
            require(getattr(self, name) >= 0, f"load.{name} must be >= 0")
        require(self.burst_factor > 0, "load.burst_factor must be > 0")


@dataclass
class PolicyConfig:
    """One policy to compare. `static`: planned once from the first hour's mean load;
    `replan`: planned from scratch every `replan_every_s` (EPLB-style); `autoscale`: moefleet's
    autoscaler every period, and its migration-aware rebalance every `rebalance_every_s`."""

    name: str
    kind: str
    replicas: int = 0  # static / replan: replicas to place (0 = every slot of hosts.count hosts)
    replan_every_s: float = 600.0
    rebalance_every_s: float = 0.0  # autoscale: 0 = never

    def __post_init__(self):
        require(bool(self.name), "policies[].name must not be empty")
        require(self.kind in POLICY_KINDS, f"policies[{self.name}].kind must be one of {POLICY_KINDS}")
        require(self.replicas >= 0, f"policies[{self.name}].replicas must be >= 0")
        require(self.replan_every_s > 0, f"policies[{self.name}].replan_every_s must be > 0")
        require(self.rebalance_every_s >= 0, f"policies[{self.name}].rebalance_every_s must be >= 0")


def _default_policies() -> list[PolicyConfig]:
    return [PolicyConfig("static", "static"), PolicyConfig("replan", "replan"),
            PolicyConfig("moefleet", "autoscale", rebalance_every_s=600.0)]


@dataclass
class Scenario:
    name: str
    duration_s: float = 3600.0
    slo_s: float = 0.05  # budget for the p99 layer latency of one period
    model: ModelShape = field(default_factory=ModelShape)
    hosts: FleetConfig = field(default_factory=FleetConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)  # `enabled` is ignored
    policies: list[PolicyConfig] = field(default_factory=_default_policies)

    def __post_init__(self):
        require(bool(self.name), "name must not be empty")
        require(self.duration_s >= self.autoscaling.period_s, "duration_s must be >= autoscaling.period_s")
        require(self.slo_s > 0, "slo_s must be > 0")
        names = [p.name for p in self.policies]
        require(len(names) > 0 and len(set(names)) == len(names), "policies: give at least one, names unique")
        need = self.model.layers * self.model.n_routed_experts
        require(self.hosts.count * self.hosts.slots >= need,
               f"hosts: {self.hosts.count} × {self.hosts.slots} slots cannot hold one replica of "
               f"{need} experts")

    @property
    def periods(self) -> int:
        return int(round(self.duration_s / self.autoscaling.period_s))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scenario:
        d = dict(d)
        for name, sub in (("model", ModelShape), ("hosts", FleetConfig), ("cost", CostConfig),
                          ("load", LoadConfig), ("autoscaling", AutoscalingConfig)):
            d[name] = build(sub, d.get(name, {}), name)
        if "policies" in d:
            require(isinstance(d["policies"], list), "policies: expected a list")
            d["policies"] = [build(PolicyConfig, p, f"policies[{i}]") for i, p in enumerate(d["policies"])]
        return build(cls, d, "scenario")


def load_scenario(path: str | Path) -> Scenario:
    """Read a YAML or JSON scenario; a relative `load.trace` resolves against the file."""
    path = Path(path)
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    require(isinstance(data, dict), f"{path}: expected a mapping at the top level")
    load = data.get("load")
    if isinstance(load, dict) and isinstance(load.get("trace"), str) and load["trace"]:
        data["load"] = {**load, "trace": str((path.parent / load["trace"]).resolve())}
    return Scenario.from_dict(data)
