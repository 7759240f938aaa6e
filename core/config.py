"""The model's shape in HF `config.json` field names (`MoEConfig`), and how every config
dataclass of a spec is built from a plain mapping (`build`) and checked (`require`, raising
`SpecError`). Shared by the experts, the router and the cluster. Plain data: no torch, no
Ray, no grpc.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["MoEConfig", "SpecError", "DTYPE_NAMES", "N_EXPERTS_ALIASES", "build", "require"]

DTYPE_NAMES = ("float32", "float16", "bfloat16")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# HF spells the routed-expert count three ways, by family.
N_EXPERTS_ALIASES = ("num_experts", "num_local_experts")
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
        require(self.scoring_func in SCORING_FUNCS, f"moe.scoring_func must be one of {SCORING_FUNCS}")
        require(self.topk_method in TOPK_METHODS, f"moe.topk_method must be one of {TOPK_METHODS}")
        for name in ("hidden_size", "moe_intermediate_size", "n_routed_experts",
                     "num_experts_per_tok", "n_group", "topk_group"):
            require(getattr(self, name) >= 1, f"moe.{name} must be >= 1")
        require(self.num_experts_per_tok <= self.n_routed_experts,
               "moe.num_experts_per_tok must be <= n_routed_experts")
        if self.topk_method != "greedy":
            require(self.n_routed_experts % self.n_group == 0,
                   "moe.n_routed_experts must be a multiple of n_group")
            require(self.topk_group <= self.n_group, "moe.topk_group must be <= n_group")
            kept = self.topk_group * (self.n_routed_experts // self.n_group)
            require(self.num_experts_per_tok <= kept,
                   f"moe.num_experts_per_tok ({self.num_experts_per_tok}) must be <= the experts in "
                   f"the kept groups (topk_group × n_routed_experts / n_group = {kept})")
        if self.topk_method == "noaux_tc":
            require(self.scoring_func == "sigmoid", "moe.topk_method noaux_tc needs scoring_func sigmoid")

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
        require(isinstance(d, dict), "moe: expected a mapping")
        d = dict(d)
        for alias in N_EXPERTS_ALIASES:
            if alias in d:
                n = d.pop(alias)
                require(d.setdefault("n_routed_experts", n) == n,
                       f"moe: {alias} ({n}) disagrees with n_routed_experts ({d['n_routed_experts']})")
        return build(cls, d, "moe")


def build(cls, d: Any, where: str):
    """An instance of dataclass `cls` from mapping `d`: unknown fields and scalars of the
    wrong type are refused, and the class's own checks run; `where` names the section."""
    require(isinstance(d, dict), f"{where}: expected a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    require(not unknown, f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    for f in dataclasses.fields(cls):
        if f.name in d and f.type in _SCALARS:
            v = d[f.name]
            ok = isinstance(v, _SCALARS[f.type]) and not (f.type != "bool" and isinstance(v, bool))
            require(ok, f"{where}.{f.name}: expected {f.type}, got {v!r}")
    try:
        return cls(**d)
    except SpecError:
        raise
    except (TypeError, ValueError) as e:  # e.g. AutoscalingConfig's own range checks
        raise SpecError(f"{where}: {e}") from None


def require(ok: bool, msg: str) -> None:
    if not ok:
        raise SpecError(msg)
