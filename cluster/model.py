"""A served model's weights and its in-process reference, built from a `ModelSpec`.

The one place that turns a spec's `weights:` section into a weight source, and that puts the
router's gating together with the reference expert maths, giving the oracle the service is
tested and benchmarked against: `Reference` for the spec as served at first, and
`VersionedReference` for a service whose experts were added and removed at runtime.

# T = tokens, H = hidden, E = routed experts
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import save

from moefleet.experts.checkpoint import CheckpointSource
from moefleet.experts.reference import ExpertWeights, MoELayer
from moefleet.experts.weights import DTYPES, RandomSource, SafetensorsSource, source_from
from moefleet.router.gating import Gate, route

from .spec import ModelSpec

__all__ = ["source_of", "source_args", "check_source", "expert_nbytes", "gate_of", "Reference",
           "VersionedReference", "expert_file", "random_expert"]


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
    return 3 * spec.moe.hidden_size * spec.moe.moe_intermediate_size * DTYPES[spec.dtype].itemsize


def gate_of(spec: ModelSpec, layer: int, source: Any = None) -> Gate:
    """The layer's router, rows = experts 0..E-1 in n_group equal groups. Pass the spec's
    `source` when reading several layers, so a checkpoint's index is read once."""
    g = (source or source_of(spec)).gate(layer)
    if g.weight.shape != (spec.moe.n_routed_experts, spec.moe.hidden_size):
        raise ValueError(f"layer {layer}: gate weight has shape {tuple(g.weight.shape)}, "
                         f"expected [{spec.moe.n_routed_experts}, {spec.moe.hidden_size}]")
    return Gate.dense(g.weight, g.bias, spec.moe.n_group)


def expert_file(gate_row: torch.Tensor, w: ExpertWeights, bias: float | None = None) -> bytes:
    """The safetensors file AddExpert takes (`moefleet add-expert --weights`): gate row [H],
    optional selection bias, and the FFN in HF names (gate_proj = w1, up_proj = w3,
    down_proj = w2). `registry.parse_new_expert` reads it back."""
    tensors = {"gate.weight": gate_row[None].contiguous(), "gate_proj.weight": w.w1.contiguous(),
               "up_proj.weight": w.w3.contiguous(), "down_proj.weight": w.w2.contiguous()}
    if bias is not None:
        tensors["gate.e_score_correction_bias"] = torch.tensor([bias])
    return save(tensors)


def random_expert(spec: ModelSpec, seed: int, gate_scale: float = 1.0
                  ) -> tuple[torch.Tensor, float | None, ExpertWeights]:
    """A new random expert for `spec`: (gate row [H], selection bias or None, weights). A
    gate_scale > 1 makes tokens pick it more often than the spec's experts."""
    g = torch.Generator().manual_seed(seed)
    h, inter = spec.moe.hidden_size, spec.moe.moe_intermediate_size
    row = gate_scale * torch.randn(h, generator=g) / h**0.5  # [H]
    w = ExpertWeights(torch.randn(inter, h, generator=g) / h**0.5,  # w1 [I, H]
                      torch.randn(h, inter, generator=g) / inter**0.5,  # w2 [H, I]
                      torch.randn(inter, h, generator=g) / h**0.5)  # w3 [I, H]
    bias = 0.05 if spec.moe.topk_method == "noaux_tc" else None
    return row, bias, w


class Reference:
    """The monolithic in-process MoE layers of a spec: the oracle and the baseline."""

    def __init__(self, spec: ModelSpec):
        src = source_of(spec)
        self.spec = spec
        self.gates = {L: gate_of(spec, L, src) for L in spec.layers}
        self.layers = {
            L: MoELayer({e: src.expert(L, e) for e in range(spec.moe.n_routed_experts)},
                        src.shared(L))
            for L in spec.layers
        }

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]"""
        topk_w, topk_ids = route(x, self.gates[layer], self.spec.moe)
        return self.layers[layer](x, topk_w, topk_ids)


class VersionedReference:
    """The reference of each routing version: the spec's experts, plus those added and minus
    those removed by changes published at or before that version (as AddExpert/RemoveExpert
    report them)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.base = Reference(spec)
        self._changes: list[tuple[int, int, int, tuple | None]] = []  # (version, layer, id, add)

    def added(self, version: int, layer: int, expert: int, gate_row: torch.Tensor,
              weights: ExpertWeights, bias: float | None = None, group: int = 0) -> None:
        """gate_row: [H]"""
        self._changes.append((version, layer, expert, (gate_row, bias, group, weights)))

    def removed(self, version: int, layer: int, expert: int) -> None:
        self._changes.append((version, layer, expert, None))

    def __call__(self, version: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H] as routing version `version` computes it."""
        gate, experts = self._at(version, layer)
        topk_w, topk_ids = route(x, gate, self.spec.moe)
        return MoELayer(experts, self.base.layers[layer].shared)(x, topk_w, topk_ids)

    def route(self, version: int, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (topk_w [T, K], topk_ids [T, K]) as routing version `version` routes."""
        return route(x, self._at(version, layer)[0], self.spec.moe)

    def _at(self, version: int, layer: int) -> tuple[Gate, dict[int, ExpertWeights]]:
        g, base = self.base.gates[layer], self.base.layers[layer]
        bias = [None] * len(g.expert_ids) if g.bias is None else g.bias.tolist()
        rows = {e: (g.weight[i], bias[i], int(g.group_ids[i])) for i, e in enumerate(g.expert_ids.tolist())}
        experts = dict(base.experts)
        for v, L, e, add in self._changes:
            if v > version or L != layer:
                continue
            if add is None:
                rows.pop(e)
                experts.pop(e)
            else:
                rows[e], experts[e] = add[:3], add[3]
        ids = sorted(rows)
        gate = Gate(torch.stack([rows[e][0] for e in ids]), torch.tensor(ids),  # [E, H], [E]
                    torch.tensor([rows[e][2] for e in ids]),
                    None if g.bias is None else torch.tensor([rows[e][1] or 0.0 for e in ids]))
        return gate, experts
