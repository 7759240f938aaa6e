"""Grouped SwiGLU over rows sorted by expert, vectorised with torch (the CPU path).

Per local expert that has rows: one fused gate+up GEMM against w13[e] ([2I, H], used in
place through a transposed view, never copied), the silu(g) * u epilogue in fp32 (in place
on the gate half when the inputs are fp32), the routing weight folded into the activation,
and the down GEMM written straight into the expert's slice of the output. The loop runs over experts,
never over tokens.

Threads: this path runs on torch's intra-op pool and respects `torch.get_num_threads()`;
it never changes it (that is process-wide state). Whoever owns the process sets it once,
deliberately: the ExpertHost at start-up, `bench/kernels.py` from its `--threads` flag.
At prefill the GEMMs are large enough for MKL's threading to keep every core busy, and at
decode the path is bound by streaming the weights, so running experts side by side would
gain nothing (bench/RESULTS.md: every variant sits at the dense-GEMM rate or the same GB/s).

It does not validate its inputs (the wrapper in `__init__` does) and also runs on CUDA
tensors, where it is the "torch per-expert loop" baseline of the benchmark.

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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [N, H] sorted by expert; w13: [E, 2I, H]; w2: [E, H, I]; offsets: [E+1] (rows of
    expert e are x[offsets[e]:offsets[e+1]]); row_weights: [N] or None; out: [N, H] or None
    -> y: [N, H]"""
    y = torch.empty_like(x) if out is None else out
    bounds = offsets.tolist()
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if lo == hi:
            continue
        rw = None if row_weights is None else row_weights[lo:hi]
        _expert_rows(x[lo:hi], w13[e], w2[e], rw, y[lo:hi])
    return y


def _expert_rows(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, rw: torch.Tensor | None, y: torch.Tensor
) -> None:
    """One expert: x [n, H]; w13 [2I, H]; w2 [H, I]; rw [n] or None; writes y [n, H].

    The epilogue runs in fp32 (in place on h for fp32 inputs, where .float() is a no-op),
    and rw scales the activation, so a bf16 result is rounded once after each GEMM."""
    inter = w2.shape[1]
    h = torch.mm(x, w13.t())  # [n, 2I]
    a = F.silu(h[:, :inter].float(), inplace=True)  # [n, I] fp32
    a.mul_(h[:, inter:])
    if rw is not None:
        a.mul_(rw[:, None])
    torch.mm(a.to(x.dtype), w2.t(), out=y)  # [n, H]
