"""Checkpoint loading benchmark: how fast a host fills its slots from an HF checkpoint on a
local disk, against a plain `safetensors.torch.load_file` of the same files.

It writes (once, then reuses) a synthetic sharded Qwen3-MoE checkpoint of about --gb GB:
config.json, model.safetensors.index.json and ~1 GB shards holding every MoE layer's router
and experts, per-expert layout, in bf16. Then it times, side by side in one run:

    load_file     safetensors.torch.load_file of every shard (every tensor materialised)
    moefleet      ExpertHost.load_weights_from of every (layer, expert) into its slots: each read
                  opens only the shards that hold the expert (safe_open), and the host stacks
                  the tensors into the kernel's w13 [S, 2I, H] / w2 [S, H, I] layout
    check         CheckpointSource.check: every key and shape from the headers alone

each cold (the files dropped from the page cache with posix_fadvise(DONTNEED) first) and
warm (read straight after), in alternating order, `--reps` times; it prints medians and the
moefleet / load_file ratio. The checkpoint's tensors are experts and routers only; GB/s are
checkpoint bytes over wall seconds. Imports no Ray.

Usage: python bench/load.py [--dir /tmp/moefleet-load-bench] [--gb 2.2] [--reps 3] [--device cpu]

# L = MoE layers, E = routed experts, H = hidden, I = expert intermediate
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moefleet.experts.checkpoint import CheckpointSource
from moefleet.experts.host import ExpertHost

assert "ray" not in sys.modules, "bench/load.py must run where Ray is not installed"

H, INTER, E, K = 2048, 768, 64, 8  # a Qwen3-30B-A3B-sized layer (its H is 2048, I 768, E 128)
_SHARD_BYTES = 1 << 30
_FFN_SHAPES = (("gate_proj", (INTER, H)), ("up_proj", (INTER, H)), ("down_proj", (H, INTER)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/moefleet-load-bench")
    ap.add_argument("--gb", type=float, default=2.2, help="checkpoint size to write (GB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the host keeps its slots (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(args.dir)
    files, nbytes, layers = _ensure_checkpoint(root, args.gb)
    print(f"# checkpoint {root}: {len(files)} shards, {nbytes / 1e9:.2f} GB, {layers} MoE layers × {E} "
          f"experts, H={H} I={INTER} bf16; {platform.node()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, host device {args.device}\n")

    src = {"checkpoint": {"path": str(root), "dtype": "bfloat16"}}
    variants = {
        "load_file": lambda: [load_file(f) for f in files],
        "moefleet": lambda: _fill_host(src, layers, args.device),
        "check": lambda: CheckpointSource(str(root), "bfloat16").check(list(range(layers))),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for cache in ("cold", "warm"):
            for name in order:
                if cache == "cold":
                    _drop_from_page_cache(files)
                t0 = time.perf_counter()
                out = variants[name]()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times.setdefault((name, cache), []).append(time.perf_counter() - t0)
                del out

    print("| variant | page cache | median s | GB/s | vs load_file |")
    print("|---|---|---|---|---|")
    for cache in ("cold", "warm"):
        base = statistics.median(times[("load_file", cache)])
        for name in variants:
            t = statistics.median(times[(name, cache)])
            rate = "" if name == "check" else f"{nbytes / t / 1e9:.2f}"
            print(f"| {name} | {cache} | {t:.3f} | {rate} | {t / base:.2f}× time |")


def _fill_host(source: dict, layers: int, device: str) -> ExpertHost:
    host = ExpertHost("bench", num_slots=layers * E, num_cpus=torch.get_num_threads(), device=device)
    for L in range(layers):
        for e in range(E):
            host.load_weights_from(slot=L * E + e, layer=L, expert=e, source=source)
    return host


def _drop_from_page_cache(files: list[str]) -> None:
    """Ask the kernel to forget the files' cached pages (clean pages; needs no privileges)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- the synthetic checkpoint -----------------------------------------------------------


def _ensure_checkpoint(root: Path, gb: float) -> tuple[list[str], int, int]:
    """(shard files, bytes of tensors, MoE layers) of a checkpoint of about `gb` GB at root."""
    per_layer = E * 3 * H * INTER * 2 + E * H * 4  # bf16 experts + fp32 router
    layers = max(1, math.ceil(gb * 1e9 / per_layer))
    config = {"model_type": "qwen3_moe", "hidden_size": H, "moe_intermediate_size": INTER,
              "num_experts": E, "num_experts_per_tok": K, "num_hidden_layers": layers,
              "norm_topk_prob": True, "hidden_act": "silu", "dtype": "bfloat16"}
    index_path = root / "model.safetensors.index.json"
    if (root / "config.json").exists() and json.loads((root / "config.json").read_text()) == config:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    else:
        print(f"# writing a {layers}-layer synthetic checkpoint to {root} ...", file=sys.stderr)
        weight_map = _write(root, config, layers)
    files = sorted({str(root / f) for f in weight_map.values()})
    return files, sum(os.path.getsize(f) for f in files), layers


def _write(root: Path, config: dict, layers: int) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, n = 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(root / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes, n = {}, 0, n + 1

    for L in range(layers):
        p = f"model.layers.{L}.mlp"
        shard[f"{p}.gate.weight"] = torch.randn(E, H, generator=g) / H**0.5  # [E, H]
        for e in range(E):
            for name, shape in _FFN_SHAPES:
                t = (torch.randn(*shape, generator=g) / shape[1] ** 0.5).to(torch.bfloat16)
                shard[f"{p}.experts.{e}.{name}.weight"] = t
                shard_bytes += t.numel() * 2
            if shard_bytes >= _SHARD_BYTES:
                flush()
    if shard:
        flush()
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(config))
    return weight_map


if __name__ == "__main__":
    main()
