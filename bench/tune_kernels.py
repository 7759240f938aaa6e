"""Tune the Triton grouped SwiGLU's launch settings on this GPU; write them to the table.

For each layer shape (the benchmark's two GPU shapes unless --shape is given), dtype and
token count (decode and prefill), time a small grid of LaunchConfigs round-robin with CUDA
events (medians), check the winner against the torch path, and write one record per
(device, dtype, E, H, I, rows) into experts/kernels/launch_configs.json. Records with the
same key are replaced; all others are kept.

Needs CUDA and triton; imports neither Ray nor anything that does.

Usage: python bench/tune_kernels.py [--shape E,H,I,K ...] [--dtype bfloat16] [--quick]

# T = tokens, K = experts per token, N = T*K rows, H = hidden, I = intermediate, E = experts
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

from moefleet.experts.kernels import grouped_swiglu
from moefleet.experts.kernels.launch import TABLE_PATH, LaunchConfig, TunedEntry

assert "ray" not in sys.modules, "bench/tune_kernels.py must run where Ray is not installed"

DEFAULT_SHAPES = ["64,2048,1408,6", "8,4096,14336,2"]  # DeepSeek-V2-Lite-like, Mixtral-like
TOKENS = (16, 4096)


# ---- candidates -------------------------------------------------------------------------


def candidates(n_rows: int, n_experts: int, quick: bool) -> list[LaunchConfig]:
    """The grid searched: small row blocks when rows per expert are few, larger otherwise."""
    few = n_rows <= 16 * n_experts
    block_m = (16, 32) if few else (64, 128)
    block_n = (64,) if quick else (64, 128)
    block_k = (64,) if quick else (32, 64, 128)
    warps_stages = ((4, 3), (4, 4)) if quick else ((4, 3), (4, 4), (8, 3), (8, 4))
    return [LaunchConfig(m, n, k, w, s) for m, n, k, (w, s)
            in itertools.product(block_m, block_n, block_k, warps_stages)]


# ---- measuring --------------------------------------------------------------------------


def _problem(E: int, H: int, I: int, K: int, t: int, dtype):  # noqa: E741
    """Random sorted rows and stacked weights on the GPU, uniform top-K routing."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    topk_ids = torch.rand(t, E, generator=gen, device="cuda").topk(K).indices  # [T, K]
    counts = torch.bincount(topk_ids.flatten(), minlength=E)  # [E]
    offsets = torch.zeros(E + 1, dtype=torch.int64, device="cuda")
    offsets[1:] = counts.cumsum(0)
    n = t * K
    x = torch.randn(n, H, generator=gen, device="cuda").to(dtype)  # [N, H]
    w13 = (torch.randn(E, 2 * I, H, generator=gen, device="cuda") / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen, device="cuda") / I**0.5).to(dtype)
    rw = torch.rand(n, generator=gen, device="cuda")  # [N]
    return x, w13, w2, offsets, rw


def _seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def tune_one(problem, configs: list[LaunchConfig], reps: int) -> tuple[LaunchConfig, float]:
    """The fastest config that launches and agrees with the torch path, and its seconds."""
    from moefleet.experts.kernels.triton_swiglu import grouped_swiglu_triton

    x, w13, w2, offsets, rw = problem
    ref = grouped_swiglu(x, w13, w2, offsets, rw, backend="torch").float()
    best: tuple[LaunchConfig, float] | None = None
    for cfg in configs:
        def run(cfg=cfg):
            return grouped_swiglu_triton(x, w13, w2, offsets, rw, config=cfg)
        try:
            y = run().float()
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: skip this one
            print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
            continue
        torch.testing.assert_close(y, ref, rtol=1e-2, atol=2e-2 * ref.abs().max().item())
        sec = _seconds(run, reps)
        if best is None or sec < best[1]:
            best = (cfg, sec)
    if best is None:
        raise RuntimeError("no candidate config launched")
    return best


# ---- the table --------------------------------------------------------------------------


def write_entries(entries: list[TunedEntry], path: Path = TABLE_PATH) -> None:
    raw = json.loads(path.read_text()) if path.exists() else {}
    key = lambda d: (d["device"], d["dtype"], d["E"], d["H"], d["I"], d["rows"])  # noqa: E731
    new = [e.to_json() for e in entries]
    fresh = {key(d) for d in new}
    kept = [d for d in raw.get("configs", []) if key(d) not in fresh]
    raw["configs"] = sorted(kept + new, key=key)
    path.write_text(json.dumps(raw, indent=2) + "\n")


def run(shapes: list[str], dtype_name: str, quick: bool, reps: int) -> list[TunedEntry]:
    device = torch.cuda.get_device_name()
    dtype = getattr(torch, dtype_name)
    entries = []
    for spec in shapes:
        E, H, I, K = (int(v) for v in spec.split(","))  # noqa: E741
        for t in TOKENS:
            cfg, sec = tune_one(_problem(E, H, I, K, t, dtype), candidates(t * K, E, quick), reps)
            print(f"{device} {dtype_name} E={E} H={H} I={I} N={t * K}: {cfg} {sec * 1e3:.3f} ms")
            entries.append(TunedEntry(device, dtype_name, E, H, I, t * K, cfg))
    return entries


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", help="E,H,I,K (repeatable)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--quick", action="store_true", help="a smaller grid, for a short session")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dry-run", action="store_true", help="print, do not write the table")
    return p.parse_args()


def main() -> None:
    args = _parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_kernels.py needs a CUDA GPU; the table is keyed by device name")
    entries = run(args.shape or DEFAULT_SHAPES, args.dtype, args.quick, args.reps)
    if not args.dry_run:
        write_entries(entries)
        print(f"wrote {len(entries)} records to {TABLE_PATH}")


if __name__ == "__main__":
    main()
