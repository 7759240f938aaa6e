"""Benchmark: end-to-end greedy generation with transformers, fully local versus experts on
moefleet (`moefleet.hf.remote_moe`), side by side in one run.

The setup of deploy/examples/hf_generate.py, bigger: a random Qwen3-MoE checkpoint (H=512,
4 decoder layers, all sparse, 32 experts top-4, I=256, fp32, byte vocabulary), served on an
embedded local Ray (2 expert hosts, 1 router). Two copies of the model are loaded: `local`
as is, `remote` with every sparse block swapped for a service call. Attention, norms and the
LM head run in this process for both.

For each batch size: one warm-up generation per path (whose tokens must be identical), then
rounds (7, or 3 with --quick) that time `generate(max_new_tokens=N, min_new_tokens=N)` on each path, the
order alternating by round so the machine's noise falls on both alike. Prints the median
seconds, tokens/s (batch × N / median) and the ratio remote / local. The machine is shared
and noisy: only the ratios within one run mean anything.

    .venv/bin/python bench/hf_e2e.py            # batch 1, 8 and 32; 32 new tokens; 7 rounds (~1.5 min)
    .venv/bin/python bench/hf_e2e.py --quick    # batch 1; 16 new tokens; 3 rounds (~30 s)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# the example's model, made the same way
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy/examples"))

import ray  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from hf_generate import random_checkpoint  # noqa: E402

from moefleet.cluster import service  # noqa: E402
from moefleet.cluster.spec import ModelSpec  # noqa: E402
from moefleet.hf import close, remote_moe  # noqa: E402

SIZES = {"hidden_size": 512, "num_hidden_layers": 4, "num_experts": 32, "num_experts_per_tok": 4,
         "moe_intermediate_size": 256, "intermediate_size": 1024, "num_attention_heads": 8,
         "num_key_value_heads": 2}
PROMPT_TOKENS = 16


def main() -> None:
    args = _parse()
    batches, tokens, reps = ([1], 16, 3) if args.quick else ([1, 8, 32], 32, 7)
    print(_machine())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ckpt = random_checkpoint(Path(tmp) / "bench-qwen3-moe", **SIZES)
        local, remote = _load(ckpt), _load(ckpt)
        service.connect_ray("local")
        spec = ModelSpec.from_dict({"weights": {"checkpoint": str(ckpt)}, "dtype": "float32",
                                    "hosts": {"count": 2, "num_cpus": 0.25}, "router": {"num_cpus": 0.25}})
        svc = service.start(spec, port=0)
        params_m = sum(p.numel() for p in local.parameters()) / 1e6
        print(f"model: qwen3_moe {SIZES}, {params_m:.0f}M params; served layers {spec.layers} on "
              f"{spec.hosts.count} hosts ({time.perf_counter() - t0:.0f}s setup)")
        try:
            remote_moe(remote, svc.address, model_name=spec.name)
            rows = [_measure(local, remote, batch, tokens, reps) for batch in batches]
        finally:
            close(remote)
            svc.shutdown()
            ray.shutdown()
    _report(rows, tokens, reps)


def _load(ckpt: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


def _measure(local, remote, batch: int, tokens: int, reps: int) -> dict:
    ids = torch.randint(0, local.config.vocab_size, (batch, PROMPT_TOKENS),
                        generator=torch.Generator().manual_seed(batch))  # [B, S]
    paths = {"local": local, "remote": remote}
    first = {name: _generate(m, ids, tokens)[0] for name, m in paths.items()}  # warm-up
    assert torch.equal(first["local"], first["remote"]), "remote tokens differ from local ones"
    secs: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(reps):
        for name in (("local", "remote") if r % 2 == 0 else ("remote", "local")):
            secs[name].append(_generate(paths[name], ids, tokens)[1])
    return {"batch": batch, **{name: statistics.median(s) for name, s in secs.items()}}


def _generate(model, ids: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out, time.perf_counter() - t0


def _report(rows: list[dict], tokens: int, reps: int) -> None:
    print(f"\ngreedy generate, prompt {PROMPT_TOKENS} tokens, {tokens} new tokens, median of {reps} rounds; "
          "tokens identical on both paths")
    print(f"{'batch':>5} | {'local s':>8} {'local tok/s':>11} | {'remote s':>8} {'remote tok/s':>12} | "
          f"{'remote/local':>12}")
    for row in rows:
        b = row["batch"]
        lt, rt = b * tokens / row["local"], b * tokens / row["remote"]
        print(f"{b:>5} | {row['local']:>8.3f} {lt:>11.1f} | {row['remote']:>8.3f} {rt:>12.1f} | "
              f"{rt / lt:>12.2f}")


def _machine() -> str:
    return (f"{platform.node()} {platform.machine()} {platform.processor() or ''}, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 1, 16 new tokens, 3 rounds")
    return p.parse_args()


if __name__ == "__main__":
    main()
