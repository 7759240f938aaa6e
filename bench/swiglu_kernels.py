"""Grouped SwiGLU benchmark: every variant measured side by side in one run, on random data.

On a CUDA machine (the GPU table), for a DeepSeek-V2-Lite-like and a Mixtral-like layer in
bf16, at prefill T=4096 and decode T=16: the Triton kernel, the torch per-expert loop, a
dense bf16 matmul of the same FLOPs (the achievable compute rate) and a device-to-device
copy of the activated experts' weights (the achievable bandwidth). CUDA events, warm-up,
medians. Without CUDA (the CPU table), at T=4096 and T=16, H=1024, E=8, K=2, I=1408, fp32:
the grouped torch path, the same with its permute/combine, the HF-transformers one_hot mask
loop, the reference MoELayer and a dense fp32 matmul of the same FLOPs.

Variants are timed round-robin (one call of each per round, in a shuffled order), so a
noisy neighbour hits all of them alike, and the table reports the median per variant.
It prints markdown meant for bench/RESULTS.md. It imports torch and moefleet.experts
only, never Ray: the GPU machine that runs it has none.

Usage: python bench/swiglu_kernels.py [--device auto|cpu|cuda] [--rounds R] [--threads N]

# T = tokens, K = experts per token, N = T*K rows, H = hidden, I = intermediate, E = experts
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moefleet.experts.kernels import grouped_swiglu
from moefleet.experts.reference import ExpertWeights, MoELayer

assert "ray" not in sys.modules, "bench/swiglu_kernels.py must run where Ray is not installed"


@dataclass(frozen=True)
class Shape:
    name: str
    E: int
    H: int
    I: int  # noqa: E741 - the intermediate size, as in the issue
    K: int


GPU_SHAPES = [Shape("DeepSeek-V2-Lite-like", 64, 2048, 1408, 6),
              Shape("Mixtral-like", 8, 4096, 14336, 2)]
CPU_SHAPE = Shape("issue CPU shape", 8, 1024, 1408, 2)
TOKENS = (4096, 16)  # prefill, decode


@dataclass
class Row:
    variant: str
    seconds: float
    flops: float | None  # useful FLOPs, or None where not meaningful
    bytes_: float | None  # bytes that define the GB/s column, or None


# ---- data -------------------------------------------------------------------------------


def _layer(s: Shape, t: int, dtype, device, gen):
    """Random x, routing and stacked weights; rows sorted by expert for the grouped paths."""
    x = torch.randn(t, s.H, generator=gen, device=device).to(dtype)  # [T, H]
    topk_ids = torch.rand(t, s.E, generator=gen, device=device).topk(s.K).indices  # [T, K]
    topk_w = torch.rand(t, s.K, generator=gen, device=device)  # [T, K]
    w1 = (torch.randn(s.E, s.I, s.H, generator=gen, device=device) / s.H**0.5).to(dtype)
    w3 = (torch.randn(s.E, s.I, s.H, generator=gen, device=device) / s.H**0.5).to(dtype)
    w2 = (torch.randn(s.E, s.H, s.I, generator=gen, device=device) / s.I**0.5).to(dtype)
    return x, topk_ids, topk_w, w1, w2, w3


def _sort_rows(topk_ids: torch.Tensor, n_experts: int):
    """topk_ids [T, K] -> order [N] of (token, k) pairs by expert, token [N], offsets [E+1]."""
    flat = topk_ids.flatten()  # [N]
    order = flat.argsort(stable=True)  # [N]
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.bincount(flat, minlength=n_experts).cumsum(0)
    return order, order // topk_ids.shape[1], offsets


# ---- baselines --------------------------------------------------------------------------


def _hf_mask_loop(x, topk_w, topk_ids, w1, w2, w3) -> torch.Tensor:
    """The HF-transformers MoE block: a one_hot expert mask, then per expert hit a where,
    a gather, three separate linears, the routing weight and an index_add."""
    y = torch.zeros_like(x)  # [T, H]
    mask = F.one_hot(topk_ids, num_classes=w1.shape[0]).permute(2, 1, 0)  # [E, K, T]
    for e in range(w1.shape[0]):
        k_idx, tok = torch.where(mask[e])
        if tok.numel() == 0:
            continue
        h = x[tok]  # [n, H]
        out = F.linear(F.silu(F.linear(h, w1[e])) * F.linear(h, w3[e]), w2[e])  # [n, H]
        y.index_add_(0, tok, out * topk_w[tok, k_idx, None])
    return y


def _grouped_end_to_end(x, topk_w, topk_ids, w13, w2) -> torch.Tensor:
    """Sort rows by expert, run the grouped torch path, combine: what the HF loop does."""
    order, tok, offsets = _sort_rows(topk_ids, w13.shape[0])
    y = grouped_swiglu(x[tok], w13, w2, offsets, topk_w.flatten()[order], backend="torch")
    return torch.zeros_like(x).index_add_(0, tok, y)


# ---- timing -----------------------------------------------------------------------------


def _median_seconds(fns: dict[str, Callable], rounds: int, cuda: bool) -> dict[str, float]:
    """Round-robin timing after warm-up calls (3 on CUDA, 1 on CPU); median per variant.
    Each round runs the variants in a fresh (seeded) order, so that none always follows
    the same neighbour's cache footprint."""
    for fn in fns.values():
        for _ in range(3 if cuda else 1):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in random.Random(r).sample(list(fns), len(fns)):
            times[name].append(_cuda_seconds(fns[name]) if cuda else _cpu_seconds(fns[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _cpu_seconds(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cuda_seconds(fn: Callable) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


# ---- the two tables ---------------------------------------------------------------------


BACK_TO_BACK = 10


def gpu_rows(s: Shape, t: int, rounds: int) -> list[Row]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, topk_ids, topk_w, w1, w2, w3 = _layer(s, t, torch.bfloat16, "cuda", gen)
    w13 = torch.cat([w1, w3], dim=1).contiguous()  # [E, 2I, H]
    order, tok, offsets = _sort_rows(topk_ids, s.E)
    xs, rw = x[tok].contiguous(), topk_w.flatten()[order].contiguous()  # [N, H], [N]
    n = xs.shape[0]
    flops = 2.0 * n * 3 * s.H * s.I
    active = int((offsets[1:] > offsets[:-1]).sum())
    w_bytes = active * 3 * s.H * s.I * xs.element_size()
    dense_a = torch.randn(n, s.H, device="cuda", dtype=torch.bfloat16)  # [N, H]
    dense_b = torch.randn(s.H, 3 * s.I, device="cuda", dtype=torch.bfloat16)  # [H, 3I]
    src = torch.empty(w_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    from moefleet.experts.kernels.triton_swiglu import grouped_swiglu_triton

    def back_to_back():
        for _ in range(BACK_TO_BACK):
            grouped_swiglu(xs, w13, w2, offsets, rw, backend="triton")

    fns = {
        "triton": lambda: grouped_swiglu(xs, w13, w2, offsets, rw, backend="triton"),
        "torch per-expert loop": lambda: grouped_swiglu(xs, w13, w2, offsets, rw, backend="torch"),
        "dense bf16 matmul (same FLOPs)": lambda: dense_a @ dense_b,
        "d2d copy (activated weights)": lambda: dst.copy_(src),
        # where the wrapper's time goes: its input checks read offsets on the host (a sync),
        # and a lone call leaves the GPU idle while the host launches
        "triton kernel alone": lambda: grouped_swiglu_triton(xs, w13, w2, offsets, rw),
        f"triton, {BACK_TO_BACK} calls back to back": back_to_back,
    }
    _check_gpu_parity(fns)
    secs = _median_seconds(fns, rounds, cuda=True)
    b2b = f"triton, {BACK_TO_BACK} calls back to back"
    return [Row("triton", secs["triton"], flops, w_bytes),
            Row("triton kernel alone (no input checks)", secs["triton kernel alone"], flops, w_bytes),
            Row(f"{b2b} (per call)", secs[b2b] / BACK_TO_BACK, flops, w_bytes),
            Row("torch per-expert loop", secs["torch per-expert loop"], flops, w_bytes),
            Row("dense bf16 matmul (same FLOPs)", secs["dense bf16 matmul (same FLOPs)"], flops, None),
            Row("d2d copy (activated weights)", secs["d2d copy (activated weights)"], None, 2 * w_bytes)]


def _check_gpu_parity(fns: dict[str, Callable]) -> None:
    ours, ref = fns["triton"]().float(), fns["torch per-expert loop"]().float()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=2e-2 * scale)


def cpu_rows(s: Shape, t: int, rounds: int) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    x, topk_ids, topk_w, w1, w2, w3 = _layer(s, t, torch.float32, "cpu", gen)
    w13 = torch.cat([w1, w3], dim=1).contiguous()  # [E, 2I, H]
    order, tok, offsets = _sort_rows(topk_ids, s.E)
    xs, rw = x[tok].contiguous(), topk_w.flatten()[order].contiguous()  # [N, H], [N]
    layer = MoELayer({e: ExpertWeights(w1[e], w2[e], w3[e]) for e in range(s.E)})
    dense_a = torch.randn(xs.shape[0], s.H)  # [N, H]
    dense_b = torch.randn(s.H, 3 * s.I)  # [H, 3I]
    flops = 2.0 * xs.shape[0] * 3 * s.H * s.I

    fns = {
        "grouped torch path (rows pre-sorted)":
            lambda: grouped_swiglu(xs, w13, w2, offsets, rw, backend="torch"),
        "grouped torch path + permute/combine":
            lambda: _grouped_end_to_end(x, topk_w, topk_ids, w13, w2),
        "HF one_hot mask loop": lambda: _hf_mask_loop(x, topk_w, topk_ids, w1, w2, w3),
        "reference MoELayer": lambda: layer(x, topk_w, topk_ids),
        "dense fp32 matmul (same FLOPs)": lambda: dense_a @ dense_b,
    }
    torch.testing.assert_close(fns["grouped torch path + permute/combine"](),
                               fns["HF one_hot mask loop"](), rtol=1e-4, atol=1e-4)
    secs = _median_seconds(fns, rounds, cuda=False)
    active = int((offsets[1:] > offsets[:-1]).sum())
    w_bytes = active * 3 * s.H * s.I * xs.element_size()  # weights of the experts hit
    return [Row(name, sec, flops, dense_b.nbytes if name.startswith("dense") else w_bytes)
            for name, sec in secs.items()]


# ---- report -----------------------------------------------------------------------------


def _table(rows: list[Row], baseline: str) -> str:
    base = next(r.seconds for r in rows if r.variant == baseline)
    lines = ["| variant | time (ms) | TFLOP/s | GB/s | speed vs " + baseline + " |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        tflops = f"{r.flops / r.seconds / 1e12:.3f}" if r.flops else "-"
        gbps = f"{r.bytes_ / r.seconds / 1e9:.1f}" if r.bytes_ else "-"
        lines.append(f"| {r.variant} | {r.seconds * 1e3:.3f} | {tflops} | {gbps} | "
                     f"{base / r.seconds:.2f}x |")
    return "\n".join(lines)


def _gpu_targets(rows: list[Row], t: int) -> str:
    by = {r.variant: r for r in rows}
    tri, loop = by["triton"], by["torch per-expert loop"]
    if t >= 1024:
        vs_loop = loop.seconds / tri.seconds
        vs_dense = by["dense bf16 matmul (same FLOPs)"].seconds / tri.seconds
        return (f"targets (prefill): {vs_loop:.2f}x the torch loop (want >= 2), "
                f"{vs_dense:.0%} of the dense GEMM rate (want >= 50%)")
    copy = by["d2d copy (activated weights)"]
    frac = (tri.bytes_ / tri.seconds) / (copy.bytes_ / copy.seconds)
    return f"target (decode): weight stream at {frac:.0%} of the copy bandwidth (want >= 50%)"


def _header(device: str, threads: int) -> str:
    triton_v = "absent"
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        pass
    where = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return (f"{time.strftime('%Y-%m-%d')} · {where} · torch {torch.__version__} · "
            f"triton {triton_v} · torch threads {threads}\n"
            f"command: python {' '.join(sys.argv)}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} ({len(names)} CPUs)" if names else platform.processor() or "cpu"


def run(device: str, rounds: int, threads: int) -> str:
    torch.set_num_threads(threads)
    out = [_header(device, threads)]
    if device == "cuda":
        for s in GPU_SHAPES:
            for t in TOKENS:
                rows = gpu_rows(s, t, rounds or 20)
                out += [f"\n**{s.name}** E={s.E} H={s.H} I={s.I} K={s.K}, T={t}, bf16 "
                        "(GB/s: activated expert weights read; for the copy, bytes read + "
                        "written)\n", _table(rows, "torch per-expert loop"), _gpu_targets(rows, t)]
    else:
        s = CPU_SHAPE
        for t in TOKENS:
            rows = cpu_rows(s, t, rounds or (7 if t >= 1024 else 51))
            out += [f"\n**{s.name}** E={s.E} H={s.H} I={s.I} K={s.K}, T={t}, fp32 (GB/s: "
                    "weights of the experts hit; for the dense matmul, its one weight)\n",
                    _table(rows, "HF one_hot mask loop")]
    return "\n".join(out)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--rounds", type=int, default=0,
                   help="0: 20 on CUDA; on the CPU 7 at prefill, 51 at decode")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch intra-op threads (default: torch's choice, one per core)")
    return p.parse_args()


def main() -> None:
    args = _parse_args()
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    print(run(device, args.rounds, args.threads))


if __name__ == "__main__":
    main()
