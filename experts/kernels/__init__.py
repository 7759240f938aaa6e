"""Grouped SwiGLU kernels over rows sorted by expert. Import the wrapper from here.

`grouped_swiglu` checks its inputs once, then runs either the Triton kernel
(`triton_swiglu.py`, GPU) or the vectorised torch path (`cpu.py`). Both compute, for each
local expert e and each of its rows, y = rw * (silu(x @ w1.T) * (x @ w3.T)) @ w2.T, with the
stacked layout of `experts.reference.stack_experts`.

This package imports without triton and without CUDA: the Triton module is imported only
when that backend is chosen. It knows nothing of routing, slots or hosts.

# N = rows, H = hidden, I = intermediate, E = local experts
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from .cpu import grouped_swiglu_cpu

__all__ = ["BACKENDS", "grouped_swiglu", "triton_available"]

BACKENDS = ("auto", "torch", "triton")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def grouped_swiglu(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [N, H] sorted by expert; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I];
    offsets: [E+1] int64, offsets[0] = 0, offsets[E] = N, rows of expert e are
    x[offsets[e]:offsets[e+1]] (may be empty); row_weights: [N] or None, multiplies each
    output row; out: [N, H] to write into, or None -> y: [N, H] in x's dtype.

    backend: "auto" (Triton when x is on CUDA and triton imports, else torch), "torch" or
    "triton". Raises ValueError on bad inputs and RuntimeError when the backend cannot run.
    Checking offsets reads them on the host (one small sync on CUDA): a malformed offsets
    tensor would otherwise leave rows unwritten, silently."""
    _check(x, w13, w2, offsets, row_weights, out)
    if _resolve(backend, x) == "triton":
        kernel = _triton_module().grouped_swiglu_triton
        return kernel(x, w13, w2, offsets, row_weights, out=out)
    return grouped_swiglu_cpu(x, w13, w2, offsets, row_weights, out=out)


@functools.cache
def triton_available() -> bool:
    """Whether the triton package imports here (a broken install counts as absent)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


# ---- backend choice ---------------------------------------------------------------------


def _triton_module() -> ModuleType:
    return importlib.import_module(".triton_swiglu", __name__)


def _resolve(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not x.is_cuda and not _triton_module().INTERPRETED:
            raise RuntimeError(
                "backend='triton' needs CUDA tensors; on the CPU use backend='torch', or "
                "set TRITON_INTERPRET=1 before triton is first imported")
    return backend


# ---- input checks -----------------------------------------------------------------------


def _check(x, w13, w2, offsets, row_weights, out) -> None:
    _check_x_and_weights(x, w13, w2)
    _check_offsets(offsets, x.shape[0], w13.shape[0], x.device)
    if row_weights is not None:
        _check_row_weights(row_weights, x)
    if out is not None:
        _check_out(out, x)


def _check_x_and_weights(x, w13, w2) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expected x [N, H], w13 [E, 2I, H], w2 [E, H, I]; got "
                         f"{tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    (_, h), (e, two_i, h13), (e2, h2, inter) = x.shape, w13.shape, w2.shape
    if not (e == e2 and h == h13 == h2 and two_i == 2 * inter):
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)} "
                         f"(want [E, 2I, H]), w2 {tuple(w2.shape)} (want [E, H, I])")
    if x.dtype not in _SUPPORTED_DTYPES or w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"x, w13, w2 must share one dtype of {_SUPPORTED_DTYPES}; got "
                         f"{x.dtype}, {w13.dtype}, {w2.dtype}")
    if w13.device != x.device or w2.device != x.device:
        raise ValueError(f"x, w13, w2 must be on one device; got {x.device}, "
                         f"{w13.device}, {w2.device}")
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _check_offsets(offsets, n_rows: int, n_experts: int, device) -> None:
    if offsets.dtype != torch.int64 or offsets.shape != (n_experts + 1,):
        raise ValueError(f"offsets must be int64 [E+1] = [{n_experts + 1}]; got "
                         f"{offsets.dtype} {tuple(offsets.shape)}")
    if offsets.device != device:
        raise ValueError(f"offsets must be on x's device {device}; got {offsets.device}")
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != n_rows:
        raise ValueError(f"offsets must run from 0 to N = {n_rows}; got {bounds[0]}..{bounds[-1]}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:], strict=True)):
        raise ValueError("offsets must be non-decreasing")


def _check_row_weights(row_weights, x) -> None:
    if row_weights.shape != (x.shape[0],) or not row_weights.is_floating_point():
        raise ValueError(f"row_weights must be a float [N] = [{x.shape[0]}]; got "
                         f"{row_weights.dtype} {tuple(row_weights.shape)}")
    if row_weights.device != x.device or not row_weights.is_contiguous():
        raise ValueError("row_weights must be contiguous and on x's device")


def _check_out(out, x) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must match x: {x.dtype} {tuple(x.shape)} on {x.device}; got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
