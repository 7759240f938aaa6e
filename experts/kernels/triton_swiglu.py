"""Grouped SwiGLU in Triton: two kernels over rows already sorted by expert.

1. `_gate_up_kernel`: one pass over x computes the gate and the up projection of a row block
   against the same expert (two fp32 accumulators) and writes act = silu(g) * u, rounded
   once to x's dtype (where an unfused bf16 model rounds it too).
2. `_down_kernel`: act @ w2[e].T in fp32, scaled by the per-row routing weight in the
   epilogue, rounded once into y.

Row blocks never straddle two experts. A block -> (expert, first row) map is built on the
device from `offsets` without a host sync; it has cdiv(N, BM) + E slots, enough for any
routing, and the spare ones exit at once. Every load and store is masked to the rows of its
expert, so no padding row is ever written and empty experts cost nothing. Programs are
ordered in groups of row blocks (`_tile`) so that tiles are re-read from L2, not HBM.

This module does not validate its inputs (the public wrapper in `__init__` does) and knows
nothing of routing or of the host. It imports triton at the top: import it lazily. If
`TRITON_INTERPRET=1` was set before triton was first imported, the kernels are interpreted
and run on CPU tensors (`INTERPRETED`).

# N = rows, H = hidden, I = intermediate, E = local experts, S = row-block slots
# (inside the kernels H and I are spelled D_H and D_I; BM, BN, BK are the tile sizes)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from .launch import LaunchConfig, pick

__all__ = ["INTERPRETED", "grouped_swiglu_triton", "block_map"]

# Fixed when the kernels below are decorated: `triton.jit` reads the same knob.
INTERPRETED: bool = bool(knobs.runtime.interpret)


# ---- kernels ----------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST works around the interpreter's bf16 `tl.dot`, which
    multiplies the raw bit patterns (triton 3.9); bf16 products are exact in fp32, so the
    upcast computes what the tensor-core dot does, up to summation order."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _tile(n_slots, n_col_tiles, GROUP_M: tl.constexpr):
    """This program's (row-block slot, column tile). Programs walk GROUP_M row blocks down
    one column of tiles before moving right, so a group's x rows and a column's weights are
    read from HBM about once and then served from L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * n_col_tiles
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(n_slots - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, act_ptr, blk_expert_ptr, blk_row_ptr, offsets_ptr,
    D_H, D_I,
    stride_xn, stride_we, stride_wi, stride_an,
    n_slots,
    UPCAST: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slot, col_tile = _tile(n_slots, tl.cdiv(D_I, BLOCK_N), GROUP_M)
    e = tl.load(blk_expert_ptr + slot)
    if e < 0:
        return
    row0 = tl.load(blk_row_ptr + slot)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BLOCK_M)  # [BM]
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] over D_I
    ks = tl.arange(0, BLOCK_K)  # [BK]
    row_ok = rows < row_end
    col_ok = cols < D_I

    x_ptrs = x_ptr + rows[:, None] * stride_xn + ks[None, :]  # [BM, BK]
    g_ptrs = w13_ptr + e * stride_we + cols[None, :] * stride_wi + ks[:, None]  # [BK, BN]
    u_ptrs = g_ptrs + D_I * stride_wi  # up rows follow the gate rows
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D_H, BLOCK_K):
        k_ok = ks < D_H - k0
        xa = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        g = _dot(xa, wg, g, UPCAST)
        u = _dot(xa, wu, u, UPCAST)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    a = g * tl.sigmoid(g) * u  # [BM, BN] fp32
    a_ptrs = act_ptr + rows[:, None] * stride_an + cols[None, :]
    tl.store(a_ptrs, a.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr, w2_ptr, y_ptr, rw_ptr, blk_expert_ptr, blk_row_ptr, offsets_ptr,
    D_H, D_I,
    stride_an, stride_we, stride_wh, stride_yn,
    n_slots,
    HAS_RW: tl.constexpr, UPCAST: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slot, col_tile = _tile(n_slots, tl.cdiv(D_H, BLOCK_N), GROUP_M)
    e = tl.load(blk_expert_ptr + slot)
    if e < 0:
        return
    row0 = tl.load(blk_row_ptr + slot)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BLOCK_M)  # [BM]
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] over D_H
    ks = tl.arange(0, BLOCK_K)  # [BK] over D_I
    row_ok = rows < row_end
    col_ok = cols < D_H

    a_ptrs = act_ptr + rows[:, None] * stride_an + ks[None, :]  # [BM, BK]
    w_ptrs = w2_ptr + e * stride_we + cols[None, :] * stride_wh + ks[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D_I, BLOCK_K):
        k_ok = ks < D_I - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, w, acc, UPCAST)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_RW:
        rw = tl.load(rw_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
        acc = acc * rw[:, None]
    y_ptrs = y_ptr + rows[:, None] * stride_yn + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---- wrappers ---------------------------------------------------------------------------


def block_map(offsets: torch.Tensor, n_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row blocks of block_m rows that never straddle two experts, built on offsets' device.

    offsets: [E+1] int64 -> (blk_expert [S], blk_row [S]) with S = cdiv(N, block_m) + E, an
    upper bound on the blocks needed; spare slots have expert -1."""
    n_experts = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]  # [E]
    blocks = (counts + block_m - 1) // block_m  # [E]
    ends = blocks.cumsum(0)  # [E] block index one past each expert's last
    slots = torch.arange(triton.cdiv(n_rows, block_m) + n_experts, device=offsets.device)  # [S]
    expert = torch.searchsorted(ends, slots, right=True)  # [S], E past the last block
    owner = expert.clamp(max=max(n_experts - 1, 0))  # [S]
    first_block = ends[owner] - blocks[owner]  # [S]
    blk_row = offsets[owner] + (slots - first_block) * block_m  # [S]
    blk_expert = torch.where(expert < n_experts, expert, -1)  # [S]
    return blk_expert, blk_row


def grouped_swiglu_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """x: [N, H] sorted by expert; w13: [E, 2I, H]; w2: [E, H, I]; offsets: [E+1] int64;
    row_weights: [N] or None; out: [N, H] or None -> y: [N, H] (x's dtype).

    Inputs are assumed checked and contiguous. config defaults to the tuned table's pick."""
    n, h = x.shape
    n_experts, inter = w2.shape[0], w2.shape[2]
    y = torch.empty_like(x) if out is None else out
    if n == 0 or n_experts == 0:
        return y
    cfg = config or _config_for(x, n_experts, h, inter)
    blk_expert, blk_row = block_map(offsets, n, cfg.block_m)
    act = torch.empty((n, inter), dtype=x.dtype, device=x.device)  # [N, I]
    slots = blk_expert.numel()
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    tiles = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
             "GROUP_M": cfg.group_m, "UPCAST": INTERPRETED and x.dtype == torch.bfloat16}

    grid = (slots * triton.cdiv(inter, cfg.block_n),)
    _gate_up_kernel[grid](
        x, w13, act, blk_expert, blk_row, offsets, h, inter,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), slots, **tiles, **launch,
    )
    grid = (slots * triton.cdiv(h, cfg.block_n),)
    _down_kernel[grid](
        act, w2, y, row_weights, blk_expert, blk_row, offsets, h, inter,
        act.stride(0), w2.stride(0), w2.stride(1), y.stride(0), slots,
        HAS_RW=row_weights is not None, **tiles, **launch,
    )
    return y


def _config_for(x: torch.Tensor, n_experts: int, h: int, inter: int) -> LaunchConfig:
    device = torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu"
    dtype = str(x.dtype).removeprefix("torch.")
    return pick(n_experts, h, inter, dtype, device, n_rows=x.shape[0])
