"""Where an MoE layer's weights come from: a deterministic random source, or a safetensors
file in HF's per-expert naming (an HF checkpoint directory is `checkpoint.py`'s).

    model.layers.{L}.mlp.gate.weight                        [E, H]
    model.layers.{L}.mlp.gate.e_score_correction_bias       [E]      (noaux_tc models)
    model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight
    model.layers.{L}.mlp.shared_experts.{gate,up,down}_proj.weight   (DeepSeek)
    model.layers.{L}.mlp.shared_expert.{gate,up,down}_proj.weight    (Qwen2-MoE)
    model.layers.{L}.mlp.shared_expert_gate.weight          [1, H]   (Qwen2-MoE)

Each reader opens the file lazily and reads only the keys it asks for, so a host touches only
its own experts. Knows nothing of gating or of where experts run.

# E = routed experts, H = hidden, I = expert intermediate, Is = shared intermediate
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from moefleet.core.dtypes import TORCH_DTYPES

from .reference import ExpertWeights, GateWeights, SharedExperts

__all__ = ["RandomSource", "SafetensorsSource", "source_from"]



@dataclass(frozen=True)
class RandomSource:
    """Deterministic random weights: the same (seed, layer, expert) gives the same tensors on
    every process, so hosts make their own experts without any transfer."""

    seed: int
    hidden_size: int
    intermediate_size: int
    n_routed_experts: int
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    gate_bias: bool = False
    dtype: str = "float32"

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        g = self._gen(layer, 1 + expert)
        return _random_ffn(g, self.hidden_size, self.intermediate_size, self.dtype)

    def gate(self, layer: int) -> GateWeights:
        g = self._gen(layer, 0)
        h, e = self.hidden_size, self.n_routed_experts
        weight = torch.randn(e, h, generator=g) / h**0.5  # [E, H]
        bias = 0.1 * torch.randn(e, generator=g) if self.gate_bias else None  # [E]
        return GateWeights(weight.to(TORCH_DTYPES[self.dtype]), bias)

    def shared(self, layer: int) -> SharedExperts | None:
        if not self.shared_intermediate_size:
            return None
        g = self._gen(layer, -1)
        ffn = _random_ffn(g, self.hidden_size, self.shared_intermediate_size, self.dtype)
        gate = None
        if self.shared_expert_gate:
            gate = (torch.randn(1, self.hidden_size, generator=g) / self.hidden_size**0.5)
            gate = gate.to(TORCH_DTYPES[self.dtype])
        return SharedExperts(ffn, gate)

    def _gen(self, layer: int, stream: int) -> torch.Generator:
        # A fixed mixing of (seed, layer, stream): stable across processes and runs.
        key = (self.seed * 1_000_003 + layer) * 1_000_033 + stream + 2
        return torch.Generator().manual_seed(key & 0x7FFF_FFFF_FFFF_FFFF)


def _random_ffn(g: torch.Generator, h: int, inter: int, dtype: str) -> ExpertWeights:
    w1 = torch.randn(inter, h, generator=g) / h**0.5  # [I, H]
    w3 = torch.randn(inter, h, generator=g) / h**0.5  # [I, H]
    w2 = torch.randn(h, inter, generator=g) / inter**0.5  # [H, I]
    dt = TORCH_DTYPES[dtype]
    return ExpertWeights(w1.to(dt), w2.to(dt), w3.to(dt))


@dataclass(frozen=True)
class SafetensorsSource:
    """Reads HF per-expert keys from one safetensors file, converting to `dtype`."""

    path: str
    dtype: str = "float32"

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        return self._ffn(f"model.layers.{layer}.mlp.experts.{expert}")

    def gate(self, layer: int) -> GateWeights:
        p = f"model.layers.{layer}.mlp.gate"
        with safe_open(self.path, framework="pt") as f:
            keys = set(f.keys())
            weight = self._get(f, keys, f"{p}.weight")
            bias_key = f"{p}.e_score_correction_bias"
            bias = f.get_tensor(bias_key).float() if bias_key in keys else None
        return GateWeights(weight, bias)

    def shared(self, layer: int) -> SharedExperts | None:
        p = f"model.layers.{layer}.mlp"
        with safe_open(self.path, framework="pt") as f:
            keys = set(f.keys())
        if f"{p}.shared_experts.gate_proj.weight" in keys:
            return SharedExperts(self._ffn(f"{p}.shared_experts"))
        if f"{p}.shared_expert.gate_proj.weight" in keys:
            with safe_open(self.path, framework="pt") as f:
                gate = self._get(f, keys, f"{p}.shared_expert_gate.weight")
            return SharedExperts(self._ffn(f"{p}.shared_expert"), gate)
        return None

    def _ffn(self, prefix: str) -> ExpertWeights:
        with safe_open(self.path, framework="pt") as f:
            keys = set(f.keys())
            w1, w3, w2 = (self._get(f, keys, f"{prefix}.{n}_proj.weight") for n in ("gate", "up", "down"))
        return ExpertWeights(w1, w2, w3)

    def _get(self, f, keys: set[str], key: str) -> torch.Tensor:
        if key not in keys:
            raise KeyError(f"{self.path}: missing tensor {key!r}")
        return f.get_tensor(key).to(TORCH_DTYPES[self.dtype])


def source_from(args: dict[str, Any]):
    """A weight source from its description as data: {"random": {...}}, {"safetensors": {...}}
    or {"checkpoint": {"path": DIR, "dtype": ...}}."""
    (kind, kw), = args.items()
    if kind == "checkpoint":
        from .checkpoint import CheckpointSource  # it builds on this module

        return CheckpointSource(**kw)
    return {"random": RandomSource, "safetensors": SafetensorsSource}[kind](**kw)
