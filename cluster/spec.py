"""The model spec: a YAML/JSON file that maps one to one onto these dataclasses.

`MoEConfig` uses the field names of HF `config.json`, so a block copied from a checkpoint's
config works as is. Everything here is plain data: no Ray, no torch, no grpc.

A spec whose weights are an HF checkpoint directory (`weights: {checkpoint: DIR}`) may leave
out `name` (the directory's name), `layers` (every MoE layer), `moe` and `dtype` (the stored
one): they come from its `config.json`. Whatever it does give must agree with that file.

    name: tiny
    layers: [0, 1]
    dtype: float32
    moe: {hidden_size: 64, moe_intermediate_size: 96, n_routed_experts: 8, ...}
    weights: {random: {seed: 0}}          # or {safetensors: FILE} or {checkpoint: HF_DIR}
    hosts: {count: 2, num_cpus: 1, num_gpus: 0, slots: 16, max_count: 4}
    router: {max_batch_tokens: 4096, max_wait_ms: 2.0, ...}
    autoscaling: {enabled: true, target_tokens_per_s: 2000, min_replicas: 1, ...}
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moefleet.core.config import DTYPE_NAMES, N_EXPERTS_ALIASES, MoEConfig, SpecError, build, require
from moefleet.router.config import RouterConfig

from .autoscale import AutoscalingConfig

__all__ = ["WeightsSource", "HostsConfig", "ModelSpec", "load_spec", "spec_for_checkpoint"]


@dataclass
class WeightsSource:
    """Exactly one of: `random` ({seed: int}), `safetensors` (one file, HF per-expert naming
    under `model.layers.{L}.mlp`) or `checkpoint` (an HF checkpoint directory)."""

    random: dict[str, int] | None = None
    safetensors: str | None = None
    checkpoint: str | None = None

    def __post_init__(self):
        given = [x for x in (self.random, self.safetensors, self.checkpoint) if x is not None]
        require(len(given) == 1, "weights: give exactly one of `random: {seed: N}`, `safetensors: FILE` "
                                "or `checkpoint: DIR`")


@dataclass
class HostsConfig:
    count: int = 1  # hosts started with the model, and the fewest it keeps
    num_cpus: float = 1
    num_gpus: float = 0
    slots: int = 64
    kernel_backend: str = "auto"  # "auto", "torch" or "triton"
    max_count: int = 0  # the most hosts scaling may start; 0 means 2 × count
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per host
    start_timeout_s: float = 60.0  # how long a new host may wait for a node before giving up
    loads_per_host: int = 1  # weight loads a serving host runs at once (changes load in rounds)
    spare: int = 0  # idle hosts kept started, so a lost host's experts move without a host start

    def __post_init__(self):
        require(self.count >= 1 and self.slots >= 1, "hosts.count and hosts.slots must be >= 1")
        require(self.loads_per_host >= 1, "hosts.loads_per_host must be >= 1")
        require(self.spare >= 0, "hosts.spare must be >= 0")
        self.max_count = self.max_count or 2 * self.count
        require(self.max_count >= self.count, "hosts.max_count must be >= hosts.count")
        require(self.start_timeout_s > 0, "hosts.start_timeout_s must be > 0")
        require(isinstance(self.resources, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in self.resources.items()),
            "hosts.resources must map resource names to numbers >= 0")
        require(not {"CPU", "GPU"} & set(self.resources),
               "hosts.resources: give CPUs and GPUs as hosts.num_cpus and hosts.num_gpus")


@dataclass
class ModelSpec:
    name: str
    layers: list[int]
    moe: MoEConfig
    weights: WeightsSource
    dtype: str = "float32"
    hosts: HostsConfig = field(default_factory=HostsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)

    def __post_init__(self):
        require(bool(self.name), "name must not be empty")
        require(len(self.layers) > 0, "layers must list at least one MoE layer index")
        require(len(set(self.layers)) == len(self.layers), "layers must not repeat")
        require(self.dtype in DTYPE_NAMES, f"dtype must be one of {DTYPE_NAMES}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        require("weights" in d, "spec needs a `weights` section")
        d["weights"] = build(WeightsSource, d["weights"], "weights")
        if d["weights"].checkpoint:
            _fill_from_checkpoint(d, d["weights"].checkpoint)
        require("moe" in d, "spec needs a `moe` section (or `weights: {checkpoint: DIR}`)")
        d["moe"] = MoEConfig.from_dict(d["moe"])
        d["hosts"] = build(HostsConfig, d.get("hosts", {}), "hosts")
        d["router"] = build(RouterConfig, d.get("router", {}), "router")
        d["autoscaling"] = build(AutoscalingConfig, d.get("autoscaling", {}), "autoscaling")
        return build(cls, d, "spec")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_spec(path: str | Path, **overrides: Any) -> ModelSpec:
    """Read a YAML or JSON spec file, with top-level `overrides` (name=..., dtype=...).
    Relative weight paths resolve against the file."""
    path = Path(path)
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    require(isinstance(data, dict), f"{path}: expected a mapping at the top level")
    data.update(overrides)
    weights = data.get("weights")
    if isinstance(weights, dict):
        data["weights"] = {k: str((path.parent / v).resolve())
                           if k in ("safetensors", "checkpoint") and isinstance(v, str) else v
                           for k, v in weights.items()}
    return ModelSpec.from_dict(data)


def spec_for_checkpoint(checkpoint: str | Path, name: str | None = None, dtype: str | None = None,
                        num_hosts: int = 1) -> ModelSpec:
    """A spec serving every MoE layer of an HF checkpoint directory on `num_hosts` hosts, with
    slots for a quarter more replicas than it has experts."""
    d: dict[str, Any] = {"weights": {"checkpoint": str(Path(checkpoint).resolve())}}
    d.update({k: v for k, v in (("name", name), ("dtype", dtype)) if v is not None})
    spec = ModelSpec.from_dict(d)
    experts = len(spec.layers) * spec.moe.n_routed_experts
    spec.hosts = build(HostsConfig, {"count": num_hosts, "slots": math.ceil(1.25 * experts / num_hosts)},
                        "hosts")
    return spec


def _fill_from_checkpoint(d: dict[str, Any], checkpoint: str) -> None:
    """Complete spec dict `d` from the checkpoint's config.json; what `d` gives must agree."""
    from moefleet.experts.hf_config import CheckpointError, read_config

    try:
        hf = read_config(checkpoint)
    except CheckpointError as e:
        raise SpecError(str(e)) from None
    d.setdefault("name", Path(checkpoint).resolve().name)
    d.setdefault("layers", list(hf.moe_layers))
    require(isinstance(d["layers"], list), "layers: expected a list of layer indices")
    dense = [L for L in d["layers"] if L not in hf.moe_layers]
    require(not dense, f"layers {dense} are not MoE layers of {checkpoint} (its MoE layers: {hf.moe_layers})")
    derived = MoEConfig.from_dict(hf.moe)
    if "moe" in d:
        require(isinstance(d["moe"], dict), "moe: expected a mapping")
        given = {("n_routed_experts" if k in N_EXPERTS_ALIASES else k): v for k, v in d["moe"].items()}
        wrong = [f"{k} is {v!r} but {checkpoint}/config.json gives {getattr(derived, k, None)!r}"
                 for k, v in given.items() if v != getattr(derived, k, None)]
        require(not wrong, "moe: " + "; ".join(wrong))
    d["moe"] = hf.moe
    if "dtype" not in d:
        require(hf.dtype in DTYPE_NAMES, f"{checkpoint} stores {hf.dtype or 'an unstated dtype'}: give "
                                        f"`dtype` (one of {DTYPE_NAMES}) to say what to serve in")
        d["dtype"] = hf.dtype
