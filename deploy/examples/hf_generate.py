"""Generate text with a transformers MoE model whose experts are served by moefleet.

Writes a small random Qwen3-MoE checkpoint (or takes yours), serves its MoE layers on an
embedded local Ray, generates greedily with the model fully local, then again with every
sparse block swapped for a moefleet call (`moefleet.hf.remote_moe`), and prints both token
sequences, whether they match, and tokens/s. There is no hub access, hence no tokenizer: the
prompt is mapped to ids byte by byte (modulo the vocabulary), and ids under 256 print as bytes.

    python deploy/examples/hf_generate.py [--checkpoint DIR] [--tokens N] [--prompt TEXT]

Needs the `hf` extra (transformers).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch
import transformers

from moefleet.cluster import service
from moefleet.cluster.spec import ModelSpec
from moefleet.hf import close, remote_moe

# the default model: Qwen3-MoE shaped, 3 decoder layers, 16 experts top-4, byte vocabulary
TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 48,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 16,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "max_position_embeddings": 512,
        "initializer_range": 0.1, "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}


def main() -> None:
    args = _parse()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else random_checkpoint(Path(tmp) / "tiny-qwen3-moe")
        run(ckpt, args.prompt, args.tokens, args.hosts)


def run(ckpt: Path, prompt: str, tokens: int, hosts: int) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids = encode(prompt, model.config.vocab_size)  # [1, S]
    print(f"model: {model.config.model_type} from {ckpt}, prompt {len(prompt)} bytes -> {ids.shape[1]} ids")

    t0 = time.perf_counter()
    service.connect_ray("local")
    spec = ModelSpec.from_dict({"weights": {"checkpoint": str(ckpt)}, "dtype": "float32",
                                "hosts": {"count": hosts, "num_cpus": 0.25}, "router": {"num_cpus": 0.25}})
    spec.hosts.slots = max(spec.hosts.slots, -(-len(spec.layers) * spec.moe.n_routed_experts // hosts))
    svc = service.start(spec, port=0)
    print(f"moefleet serves {spec.name!r} layers {spec.layers} on {svc.address} "
          f"({time.perf_counter() - t0:.1f}s to start)")
    try:
        local, local_s = generate(model, ids, tokens)
        remote_moe(model, svc.address, model_name=spec.name)
        remote, remote_s = generate(model, ids, tokens)
        close(model)
    finally:
        svc.shutdown()
        ray.shutdown()
    for label, out, secs in (("local", local, local_s), ("moefleet", remote, remote_s)):
        new = out[0, ids.shape[1]:].tolist()
        print(f"{label:>8}: {tokens / secs:6.1f} tokens/s  ids {new}")
        print(f"{'':>8}  text {decode(new)!r}")
    print(f"identical to local generation: {torch.equal(local, remote)}")


def generate(model: transformers.PreTrainedModel, ids: torch.Tensor,
             tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy, exactly `tokens` new ids (no early stop); returns [1, S + tokens] and seconds."""
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out, time.perf_counter() - t0


def random_checkpoint(path: Path, seed: int = 0, **sizes: int) -> Path:
    """Write a random Qwen3-MoE checkpoint (`TINY`, with `sizes` overriding) to `path`. Its
    routers are re-drawn with a larger std so that routing is decisive (HF's default init
    makes it almost uniform)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**{**TINY, **sizes}),
                                                          dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 2.0 / model.config.hidden_size**0.5)
    model.save_pretrained(str(path))
    return path


def encode(text: str, vocab_size: int) -> torch.Tensor:
    return torch.tensor([[b % vocab_size for b in text.encode()]])  # [1, S]


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode(errors="replace")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="an HF MoE checkpoint directory (default: a tiny random one)")
    p.add_argument("--tokens", type=int, default=20, help="new tokens to generate")
    p.add_argument("--prompt", default="moefleet serves the experts; ")
    p.add_argument("--hosts", type=int, default=2, help="expert hosts")
    return p.parse_args()


if __name__ == "__main__":
    main()
