"""Tiny random transformers MoE models, one per supported family, and their checkpoints.

    tiny_config("deepseek_v3", num_hidden_layers=4)  -> a transformers config
    tiny_model("qwen2_moe", seed=0)                  -> a random fp32 *ForCausalLM, eval mode
    save_tiny("mixtral", dir, fused=True)            -> the model, written as a checkpoint

Every family has hidden 64, 3 decoder layers and a 128-token vocabulary (special ids inside
it). Routing is made decisive: each router is re-drawn with std 0.25 (logits of std ~2 on
RMS-normed inputs), so top-k has no near-ties that fp32 rounding could flip, and the weights
elsewhere are large enough (initializer_range 0.1) that the MoE output moves the logits.
Which layers are dense: deepseek_* layer 0 (first_k_dense_replace=1), qwen2_moe layer 0
(mlp_only_layers), qwen3_moe layer 2 (mlp_only_layers); mixtral and olmoe none.

Knows transformers' config fields and checkpoint naming; knows nothing of moefleet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

__all__ = ["FAMILIES", "DENSE_LAYERS", "tiny_config", "tiny_model", "save_tiny"]

_COMMON: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.1,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
}
_MLA: dict[str, Any] = {"num_key_value_heads": 4, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
                        "qk_nope_head_dim": 16, "v_head_dim": 16, "intermediate_size": 96,
                        "moe_intermediate_size": 48, "first_k_dense_replace": 1}
_FAMILIES: dict[str, tuple[type, dict[str, Any]]] = {
    "mixtral": (transformers.MixtralConfig, {"intermediate_size": 48, "num_local_experts": 8,
                                             "num_experts_per_tok": 2}),
    "olmoe": (transformers.OlmoeConfig, {"intermediate_size": 48, "num_experts": 16,
                                         "num_experts_per_tok": 4}),
    "qwen2_moe": (transformers.Qwen2MoeConfig, {
        "intermediate_size": 96, "moe_intermediate_size": 48, "shared_expert_intermediate_size": 80,
        "num_experts": 12, "num_experts_per_tok": 4, "mlp_only_layers": [0]}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, {
        "intermediate_size": 96, "moe_intermediate_size": 48, "num_experts": 12,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "mlp_only_layers": [2]}),
    "deepseek_v2": (transformers.DeepseekV2Config, {
        **_MLA, "q_lora_rank": None, "n_routed_experts": 16, "num_experts_per_tok": 3,
        "n_shared_experts": 2, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.0}),
    "deepseek_v3": (transformers.DeepseekV3Config, {
        **_MLA, "q_lora_rank": 32, "n_routed_experts": 16, "num_experts_per_tok": 4,
        "n_shared_experts": 1, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
        "norm_topk_prob": True}),
}
FAMILIES = tuple(sorted(_FAMILIES))
DENSE_LAYERS = {"mixtral": [], "olmoe": [], "qwen2_moe": [0], "qwen3_moe": [2],
                "deepseek_v2": [0], "deepseek_v3": [0]}
_GATE_STD = 0.25
_BIAS_STD = 0.05  # DeepSeek-V3's e_score_correction_bias, next to sigmoid scores in (0, 1)


def tiny_config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    cls, fields = _FAMILIES[family]
    return cls(**{**_COMMON, **fields, **overrides})


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A random fp32 causal LM of `family` in eval mode, the same for the same seed."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides),
                                                          dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is None:  # a dense MLP
                continue
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * _GATE_STD)
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(
                    torch.randn(gate.e_score_correction_bias.shape, generator=g) * _BIAS_STD)
    return model.eval()


def save_tiny(family: str, path: str | Path, *, max_shard_size: str | int | None = None,
              fused: bool = False, seed: int = 0) -> transformers.PreTrainedModel:
    """Write `tiny_model(family, seed)` to directory `path` with save_pretrained (per-expert
    tensors; sharded with an index when max_shard_size is given) and return the model.
    fused=True then rewrites every MoE layer's experts in the transformers-v5 fused layout."""
    model = tiny_model(family, seed)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kw)
    if fused:
        _fuse(Path(path))
    return model


# ---- the fused layout ----------------------------------------------------------------------

# model.layers.{L}.{block}.experts.{e}.{proj}.weight; Mixtral: block_sparse_moe and w1/w3/w2
_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                         r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def _fuse(path: Path) -> None:
    """Per MoE layer L: `model.layers.{L}.mlp.experts.gate_up_proj [E, 2I, H]` (rows [:I] the
    gate_proj, [I:] the up_proj of each expert) and `.down_proj [E, H, I]` replace the
    per-expert keys; Mixtral's `block_sparse_moe.gate.weight` moves to `mlp.gate.weight`.
    Each fused tensor goes to the shard that held its layer's first expert."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    shards = {f: load_file(str(path / f)) for f in files}
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # L -> e -> role -> [I, H] / [H, I]
    home: dict[int, str] = {}
    for f, tensors in shards.items():
        for key in list(tensors):
            m = _PER_EXPERT.match(key)
            if m:
                L, e = int(m[1]), int(m[2])
                experts.setdefault(L, {}).setdefault(e, {})[_ROLE[m[3]]] = tensors.pop(key)
                home.setdefault(L, f)
            elif ".block_sparse_moe.gate." in key:
                tensors[key.replace(".block_sparse_moe.", ".mlp.")] = tensors.pop(key)
    for L, by_expert in experts.items():
        ffns = [by_expert[e] for e in range(len(by_expert))]
        p = f"model.layers.{L}.mlp.experts"
        shards[home[L]][f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([w["gate"], w["up"]], dim=0) for w in ffns])  # [E, 2I, H]
        shards[home[L]][f"{p}.down_proj"] = torch.stack([w["down"] for w in ffns])  # [E, H, I]
    for f, tensors in shards.items():
        if tensors:
            tensors = {k: t.contiguous() for k, t in tensors.items()}
            save_file(tensors, str(path / f), metadata={"format": "pt"})
        else:  # a shard that held only per-expert tensors
            (path / f).unlink()
    if index:
        index["weight_map"] = {k: f for f, tensors in shards.items() for k in sorted(tensors)}
        index_file.write_text(json.dumps(index, indent=2))
