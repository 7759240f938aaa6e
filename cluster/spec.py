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

from .autoscale import AutoscalingConfig

__all__ = [
    "MoEConfig",
    "WeightsSource",
    "HostsConfig",
    "RouterConfig",
    "ModelSpec",
    "SpecError",
    "load_spec",
    "spec_for_checkpoint",
    "DTYPE_NAMES",
]

DTYPE_NAMES = ("float32", "float16", "bfloat16")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# HF spells the routed-expert count three ways, by family.
_N_EXPERTS_ALIASES = ("num_experts", "num_local_experts")


# Field annotations (strings, under `from __future__ import annotations`) checked on load.
_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


class SpecError(ValueError):
    """A model spec that cannot be served, with the offending field in the message."""


@dataclass
class MoEConfig:
    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one shared expert of this width
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False

    def __post_init__(self):
        _check(self.scoring_func in SCORING_FUNCS, f"moe.scoring_func must be one of {SCORING_FUNCS}")
        _check(self.topk_method in TOPK_METHODS, f"moe.topk_method must be one of {TOPK_METHODS}")
        for name in ("hidden_size", "moe_intermediate_size", "n_routed_experts",
                     "num_experts_per_tok", "n_group", "topk_group"):
            _check(getattr(self, name) >= 1, f"moe.{name} must be >= 1")
        _check(self.num_experts_per_tok <= self.n_routed_experts,
               "moe.num_experts_per_tok must be <= n_routed_experts")
        if self.topk_method != "greedy":
            _check(self.n_routed_experts % self.n_group == 0,
                   "moe.n_routed_experts must be a multiple of n_group")
            _check(self.topk_group <= self.n_group, "moe.topk_group must be <= n_group")
            kept = self.topk_group * (self.n_routed_experts // self.n_group)
            _check(self.num_experts_per_tok <= kept,
                   f"moe.num_experts_per_tok ({self.num_experts_per_tok}) must be <= the experts in "
                   f"the kept groups (topk_group × n_routed_experts / n_group = {kept})")
        if self.topk_method == "noaux_tc":
            _check(self.scoring_func == "sigmoid", "moe.topk_method noaux_tc needs scoring_func sigmoid")

    @property
    def group_limited(self) -> bool:
        """Experts are chosen only within the top `topk_group` of `n_group` groups."""
        return self.topk_method != "greedy" and self.n_group > 1

    @property
    def shared_intermediate_size(self) -> int:
        """Width of the fused shared FFN: DeepSeek's n_shared_experts × I, or Qwen2's size."""
        if self.shared_expert_intermediate_size:
            return self.shared_expert_intermediate_size
        return self.n_shared_experts * self.moe_intermediate_size

    @property
    def shared_expert_gate(self) -> bool:
        """Qwen2-MoE gates its shared expert with a per-token sigmoid; DeepSeek does not."""
        return self.shared_expert_intermediate_size > 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        _check(isinstance(d, dict), "moe: expected a mapping")
        d = dict(d)
        for alias in _N_EXPERTS_ALIASES:
            if alias in d:
                n = d.pop(alias)
                _check(d.setdefault("n_routed_experts", n) == n,
                       f"moe: {alias} ({n}) disagrees with n_routed_experts ({d['n_routed_experts']})")
        return _build(cls, d, "moe")


@dataclass
class WeightsSource:
    """Exactly one of: `random` ({seed: int}), `safetensors` (one file, HF per-expert naming
    under `model.layers.{L}.mlp`) or `checkpoint` (an HF checkpoint directory)."""

    random: dict[str, int] | None = None
    safetensors: str | None = None
    checkpoint: str | None = None

    def __post_init__(self):
        given = [x for x in (self.random, self.safetensors, self.checkpoint) if x is not None]
        _check(len(given) == 1, "weights: give exactly one of `random: {seed: N}`, `safetensors: FILE` "
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
        _check(self.count >= 1 and self.slots >= 1, "hosts.count and hosts.slots must be >= 1")
        _check(self.loads_per_host >= 1, "hosts.loads_per_host must be >= 1")
        _check(self.spare >= 0, "hosts.spare must be >= 0")
        self.max_count = self.max_count or 2 * self.count
        _check(self.max_count >= self.count, "hosts.max_count must be >= hosts.count")
        _check(self.start_timeout_s > 0, "hosts.start_timeout_s must be > 0")
        _check(isinstance(self.resources, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in self.resources.items()),
            "hosts.resources must map resource names to numbers >= 0")
        _check(not {"CPU", "GPU"} & set(self.resources),
               "hosts.resources: give CPUs and GPUs as hosts.num_cpus and hosts.num_gpus")


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
        _check(self.max_batch_tokens >= 1, "router.max_batch_tokens must be >= 1")
        _check(self.start_timeout_s > 0, "router.start_timeout_s must be > 0")
        _check(self.max_wait_ms >= 0, "router.max_wait_ms must be >= 0")
        _check(self.max_queue_delay_s > 0, "router.max_queue_delay_s must be > 0")
        _check(0 <= self.min_idle_cpu < 1, "router.min_idle_cpu must be in [0, 1)")
        _check(0 <= self.restore_wait_s < math.inf, "router.restore_wait_s must be >= 0 and finite")
        for name in ("max_queue_tokens", "max_request_tokens", "max_message_mb", "max_concurrent_rpcs"):
            _check(getattr(self, name) >= 1, f"router.{name} must be >= 1")
        _check(self.transport in ("auto", "grpc", "ray"), "router.transport must be auto, grpc or ray")
        _check(self.grpc_max_bytes >= 0, "router.grpc_max_bytes must be >= 0")


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
        _check(bool(self.name), "name must not be empty")
        _check(len(self.layers) > 0, "layers must list at least one MoE layer index")
        _check(len(set(self.layers)) == len(self.layers), "layers must not repeat")
        _check(self.dtype in DTYPE_NAMES, f"dtype must be one of {DTYPE_NAMES}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        _check("weights" in d, "spec needs a `weights` section")
        d["weights"] = _build(WeightsSource, d["weights"], "weights")
        if d["weights"].checkpoint:
            _fill_from_checkpoint(d, d["weights"].checkpoint)
        _check("moe" in d, "spec needs a `moe` section (or `weights: {checkpoint: DIR}`)")
        d["moe"] = MoEConfig.from_dict(d["moe"])
        d["hosts"] = _build(HostsConfig, d.get("hosts", {}), "hosts")
        d["router"] = _build(RouterConfig, d.get("router", {}), "router")
        d["autoscaling"] = _build(AutoscalingConfig, d.get("autoscaling", {}), "autoscaling")
        return _build(cls, d, "spec")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_spec(path: str | Path, **overrides: Any) -> ModelSpec:
    """Read a YAML or JSON spec file, with top-level `overrides` (name=..., dtype=...).
    Relative weight paths resolve against the file."""
    path = Path(path)
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    _check(isinstance(data, dict), f"{path}: expected a mapping at the top level")
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
    spec.hosts = _build(HostsConfig, {"count": num_hosts, "slots": math.ceil(1.25 * experts / num_hosts)},
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
    _check(isinstance(d["layers"], list), "layers: expected a list of layer indices")
    dense = [L for L in d["layers"] if L not in hf.moe_layers]
    _check(not dense, f"layers {dense} are not MoE layers of {checkpoint} (its MoE layers: {hf.moe_layers})")
    derived = MoEConfig.from_dict(hf.moe)
    if "moe" in d:
        _check(isinstance(d["moe"], dict), "moe: expected a mapping")
        given = {("n_routed_experts" if k in _N_EXPERTS_ALIASES else k): v for k, v in d["moe"].items()}
        wrong = [f"{k} is {v!r} but {checkpoint}/config.json gives {getattr(derived, k, None)!r}"
                 for k, v in given.items() if v != getattr(derived, k, None)]
        _check(not wrong, "moe: " + "; ".join(wrong))
    d["moe"] = hf.moe
    if "dtype" not in d:
        _check(hf.dtype in DTYPE_NAMES, f"{checkpoint} stores {hf.dtype or 'an unstated dtype'}: give "
                                        f"`dtype` (one of {DTYPE_NAMES}) to say what to serve in")
        d["dtype"] = hf.dtype


def _build(cls, d: Any, where: str):
    _check(isinstance(d, dict), f"{where}: expected a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    _check(not unknown, f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    for f in dataclasses.fields(cls):
        if f.name in d and f.type in _SCALARS:
            v = d[f.name]
            ok = isinstance(v, _SCALARS[f.type]) and not (f.type != "bool" and isinstance(v, bool))
            _check(ok, f"{where}.{f.name}: expected {f.type}, got {v!r}")
    try:
        return cls(**d)
    except SpecError:
        raise
    except (TypeError, ValueError) as e:  # e.g. AutoscalingConfig's own range checks
        raise SpecError(f"{where}: {e}") from None


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise SpecError(msg)
