"""A served model's weights, built from a `ModelSpec`: the one place that turns a spec's
`weights:` section into a weight source (the oracle built from them: `moefleet.testing`).

# H = hidden, E = routed experts
"""

from __future__ import annotations

from typing import Any

from moefleet.core.dtypes import TORCH_DTYPES
from moefleet.experts.checkpoint import CheckpointSource
from moefleet.experts.weights import RandomSource, SafetensorsSource, source_from
from moefleet.router.gating import Gate

from .spec import ModelSpec

__all__ = ["source_of", "source_args", "check_source", "expert_nbytes", "gate_of"]


def source_args(spec: ModelSpec) -> dict[str, Any]:
    """The weight source as plain data, to send to hosts: each host reads its own experts."""
    if spec.weights.safetensors:
        return {"safetensors": {"path": spec.weights.safetensors, "dtype": spec.dtype}}
    if spec.weights.checkpoint:
        return {"checkpoint": {"path": spec.weights.checkpoint, "dtype": spec.dtype}}
    cfg = spec.moe
    return {"random": {
        "seed": int(spec.weights.random.get("seed", 0)),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.n_routed_experts,
        "shared_intermediate_size": cfg.shared_intermediate_size,
        "shared_expert_gate": cfg.shared_expert_gate,
        "gate_bias": cfg.topk_method == "noaux_tc",
        "dtype": spec.dtype,
    }}


def source_of(spec: ModelSpec) -> RandomSource | SafetensorsSource | CheckpointSource:
    return source_from(source_args(spec))


def check_source(spec: ModelSpec) -> None:
    """Validate the spec's weights before anything loads: for a checkpoint, every key and
    shape its layers need, from the files' headers (a CheckpointError names what is wrong)."""
    src = source_of(spec)
    if isinstance(src, CheckpointSource):
        src.check(spec.layers)


def expert_nbytes(spec: ModelSpec) -> int:
    """One routed expert's weights in the served dtype: w1, w2, w3 of [I, H]."""
    return 3 * spec.moe.hidden_size * spec.moe.moe_intermediate_size * TORCH_DTYPES[spec.dtype].itemsize


def gate_of(spec: ModelSpec, layer: int, source: Any = None) -> Gate:
    """The layer's router, rows = experts 0..E-1 in n_group equal groups. Pass the spec's
    `source` when reading several layers, so a checkpoint's index is read once."""
    g = (source or source_of(spec)).gate(layer)
    if g.weight.shape != (spec.moe.n_routed_experts, spec.moe.hidden_size):
        raise ValueError(f"layer {layer}: gate weight has shape {tuple(g.weight.shape)}, "
                         f"expected [{spec.moe.n_routed_experts}, {spec.moe.hidden_size}]")
    return Gate.dense(g.weight, g.bias, spec.moe.n_group)
