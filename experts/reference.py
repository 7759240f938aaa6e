"""Reference expert maths: the SwiGLU FFN and a monolithic in-process MoE layer.

These are the plain, obviously-correct twins of the fast paths. The grouped kernels in
`kernels/` are held to `swiglu`; the service as a whole is held to `MoELayer`.

This module knows nothing of gating: `MoELayer` is handed the routing decision
(`topk_w`, `topk_ids`) by whoever calls it, so the oracle stays independent of the router.

# T = tokens, H = hidden, I = expert intermediate, E = routed experts, K = experts per token
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ExpertWeights", "GateWeights", "SharedExperts", "MoELayer", "swiglu", "stack_experts"]


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert in HF naming: down(silu(gate(x)) * up(x)).

    x: [T, H]; w1 (gate_proj): [I, H]; w3 (up_proj): [I, H]; w2 (down_proj): [H, I] -> [T, H]
    """
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


@dataclass
class GateWeights:
    """A layer's router as stored: one row per routed expert, and DeepSeek-V3's selection bias."""

    weight: torch.Tensor  # [E, H]
    bias: torch.Tensor | None = None  # [E]


@dataclass
class ExpertWeights:
    """One expert's FFN, HF orientation: w1 = gate_proj [I, H], w2 = down_proj [H, I],
    w3 = up_proj [I, H]."""

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1, self.w2, self.w3)


@dataclass
class SharedExperts:
    """Always-on experts. DeepSeek fuses its n_shared_experts into one wide FFN; Qwen2-MoE
    adds a sigmoid gate per token (`gate` [1, H]) in front of its single shared expert."""

    ffn: ExpertWeights
    gate: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ffn(x)  # [T, H]
        if self.gate is not None:
            y = torch.sigmoid(x @ self.gate.T) * y  # [T, 1] * [T, H]
        return y


def stack_experts(experts: list[ExpertWeights]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack experts into the grouped-kernel layout: w13 [E, 2I, H] (gate rows, then up rows)
    and w2 [E, H, I]."""
    w13 = torch.stack([torch.cat([e.w1, e.w3], dim=0) for e in experts])
    w2 = torch.stack([e.w2 for e in experts])
    return w13, w2


class MoELayer:
    """The monolithic MoE FFN: every routed expert in this process, plus the shared experts.

    `experts` maps expert id -> weights (ids need not be contiguous). The layer loops over
    experts, the way HF modelling code does; it is the oracle, not the fast path.
    """

    def __init__(self, experts: dict[int, ExpertWeights], shared: SharedExperts | None = None):
        self.experts = experts
        self.shared = shared

    def __call__(self, x: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; topk_w: [T, K] (already scaled); topk_ids: [T, K] -> [T, H]"""
        out = torch.zeros_like(x, dtype=torch.float32)
        for e, ffn in self.experts.items():
            tok, k = torch.nonzero(topk_ids == e, as_tuple=True)
            if tok.numel():
                y = ffn(x[tok]).float()  # [n, H]
                out.index_add_(0, tok, y * topk_w[tok, k, None].float())
        if self.shared is not None:
            out += self.shared(x).float()
        return out.to(x.dtype)
