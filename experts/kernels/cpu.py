"""Grouped SwiGLU over rows sorted by expert, vectorised with torch (the CPU path).

One GEMM pair per local expert that has rows; never a loop over tokens.

# N = rows, H = hidden, I = intermediate, E = local experts (slots)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_swiglu_cpu"]


def grouped_swiglu_cpu(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [N, H] sorted by expert; w13: [E, 2I, H]; w2: [E, H, I]; offsets: [E+1] (rows of
    expert e are x[offsets[e]:offsets[e+1]]); row_weights: [N] or None -> y: [N, H]"""
    inter = w2.shape[2]
    y = torch.empty_like(x)
    bounds = offsets.tolist()
    for e in range(w13.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        h = x[lo:hi] @ w13[e].T  # [n, 2I]
        a = F.silu(h[:, :inter]) * h[:, inter:]  # [n, I]
        torch.matmul(a, w2[e].T, out=y[lo:hi])  # [n, H]
    if row_weights is not None:
        y *= row_weights[:, None].to(y.dtype)
    return y
