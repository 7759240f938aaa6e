"""Small model specs, one per HF gating family, shared by the integration and e2e tests."""

from __future__ import annotations

from typing import Any

from moefleet.cluster.spec import ModelSpec

_BASE: dict[str, Any] = {"hidden_size": 64, "moe_intermediate_size": 48}

FAMILIES: dict[str, dict[str, Any]] = {
    # softmax top-k, renormalised
    "mixtral": {"n_routed_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True},
    # softmax top-k, not renormalised
    "olmoe": {"n_routed_experts": 16, "num_experts_per_tok": 4},
    # softmax top-k + one shared expert behind a sigmoid gate
    "qwen2_moe": {"n_routed_experts": 12, "num_experts_per_tok": 4,
                  "shared_expert_intermediate_size": 80},
    # group-limited greedy (group max), scaled, two fused shared experts
    "deepseek_v2": {"n_routed_experts": 16, "num_experts_per_tok": 3, "n_shared_experts": 2,
                    "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                    "routed_scaling_factor": 16.0},
    # sigmoid + bias-corrected selection, group score = top-2 sum, renormalised and scaled
    "deepseek_v3": {"n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1,
                    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 4,
                    "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5},
}


def family_spec(family: str, **overrides: Any) -> ModelSpec:
    """A two-layer random-weight spec of `family`, on two hosts."""
    d: dict[str, Any] = {
        "name": family,
        "layers": [1, 3],
        "dtype": "float32",
        "moe": {**_BASE, **FAMILIES[family]},
        "weights": {"random": {"seed": 7}},
        "hosts": {"count": 2, "num_cpus": 0.25, "slots": 16},
        "router": {"num_cpus": 0.25},
    }
    for key, value in overrides.items():
        d[key] = {**d.get(key, {}), **value} if isinstance(value, dict) else value
    return ModelSpec.from_dict(d)


def save_hf_checkpoint(spec: ModelSpec, path: str) -> None:
    """Write `spec`'s random weights to one safetensors file in HF per-expert naming
    (DeepSeek's `shared_experts.*`, or Qwen2's `shared_expert.*` + `shared_expert_gate`)."""
    from safetensors.torch import save_file

    from moefleet.cluster.model import source_of

    src, cfg, tensors = source_of(spec), spec.moe, {}
    for L in spec.layers:
        p = f"model.layers.{L}.mlp"
        gate = src.gate(L)
        tensors[f"{p}.gate.weight"] = gate.weight
        if gate.bias is not None:
            tensors[f"{p}.gate.e_score_correction_bias"] = gate.bias
        ffns = {f"{p}.experts.{e}": src.expert(L, e) for e in range(cfg.n_routed_experts)}
        shared = src.shared(L)
        if shared is not None:
            ffns[f"{p}.shared_expert" if shared.gate is not None else f"{p}.shared_experts"] = shared.ffn
            if shared.gate is not None:
                tensors[f"{p}.shared_expert_gate.weight"] = shared.gate
        for prefix, w in ffns.items():
            for name, t in (("gate_proj", w.w1), ("up_proj", w.w3), ("down_proj", w.w2)):
                tensors[f"{prefix}.{name}.weight"] = t.contiguous()
    save_file(tensors, path)
