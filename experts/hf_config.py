"""What an HF checkpoint's `config.json` says about its MoE layers, for the five families.

    read_config(dir) -> HFConfig: the model_type's family (where its tensors are named),
    the MoE fields in moefleet's names (`MoEConfig`), which decoder layers are sparse, the
    stored dtype and the FP8 block size, if any.

    model_type    routed experts      expert width            sparse layers
    mixtral       num_local_experts   intermediate_size       all
    olmoe         num_experts         intermediate_size       all
    qwen2_moe     num_experts         moe_intermediate_size   decoder_sparse_step, mlp_only_layers
    qwen3_moe     num_experts         moe_intermediate_size   decoder_sparse_step, mlp_only_layers
    deepseek_v2   n_routed_experts    moe_intermediate_size   first_k_dense_replace, moe_layer_freq
    deepseek_v3   n_routed_experts    moe_intermediate_size   first_k_dense_replace, moe_layer_freq

Plain JSON in, plain data out: no torch, no safetensors, no Ray. Tensor reading is
`checkpoint.py`'s business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "Family", "HFConfig", "FAMILIES", "read_config"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be served; the message names the file, key or field."""


@dataclass(frozen=True)
class Family:
    """Where a family keeps its MoE tensors under `model.layers.{L}.`."""

    blocks: tuple[str, ...]  # the MoE block's attribute, in the order to try
    ffn: tuple[str, str, str]  # a routed expert's (gate, up, down) projection names
    shared: str = ""  # the shared experts' module, if the family has one
    shared_gate: bool = False  # Qwen2-MoE: a sigmoid gate [1, H] on the shared expert


_SWIGLU = ("gate_proj", "up_proj", "down_proj")
FAMILIES: dict[str, Family] = {
    # transformers 5 names Mixtral's block `mlp` in memory; checkpoints say `block_sparse_moe`
    "mixtral": Family(("block_sparse_moe", "mlp"), ("w1", "w3", "w2")),
    "olmoe": Family(("mlp",), _SWIGLU),
    "qwen2_moe": Family(("mlp",), _SWIGLU, "shared_expert", shared_gate=True),
    "qwen3_moe": Family(("mlp",), _SWIGLU),
    "deepseek_v2": Family(("mlp",), _SWIGLU, "shared_experts"),
    "deepseek_v3": Family(("mlp",), _SWIGLU, "shared_experts"),
}


@dataclass(frozen=True)
class HFConfig:
    model_type: str
    family: Family
    moe: dict[str, Any]  # MoEConfig fields
    moe_layers: list[int]  # decoder layers whose MLP is sparse
    num_hidden_layers: int
    dtype: str | None  # as stored (config.json's `dtype` / `torch_dtype`)
    fp8_block: tuple[int, int] | None  # DeepSeek FP8: [out, in] block of each weight_scale_inv

    @property
    def shared_intermediate_size(self) -> int:
        """Qwen2-MoE's shared expert width, or DeepSeek's n_shared_experts × I; 0 if none."""
        m = self.moe
        qwen2 = m.get("shared_expert_intermediate_size", 0)
        return qwen2 or m.get("n_shared_experts", 0) * m["moe_intermediate_size"]


def read_config(path: str | Path) -> HFConfig:
    """Read `config.json` in checkpoint directory `path`."""
    path = Path(path)
    try:
        c = json.loads((path / "config.json").read_text())
    except OSError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot read config.json: {e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON: {e}") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{path / 'config.json'}: expected a JSON object")
    return from_dict(c, where=str(path / "config.json"))


def from_dict(c: dict[str, Any], where: str = "config.json") -> HFConfig:
    f = _Fields(c, where)
    model_type = f.get("model_type", str)
    if model_type not in FAMILIES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; "
                              f"supported: {sorted(FAMILIES)}")
    act = f.get("hidden_act", str, "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported: moefleet's experts "
                              "are SwiGLU (silu)")
    n_layers = f.get("num_hidden_layers", int)
    moe, sparse = _FIELDS[model_type](f)
    dtype = c.get("dtype") or c.get("torch_dtype")
    return HFConfig(model_type, FAMILIES[model_type], moe, [L for L in range(n_layers) if sparse(L)],
                    n_layers, dtype if isinstance(dtype, str) else None, _fp8_block(f))


# ---- per-family fields ----------------------------------------------------------------


class _Fields:
    """Typed reads of config.json fields, with errors that name the field."""

    def __init__(self, c: dict[str, Any], where: str):
        self.c, self.where = c, where

    def get(self, name: str, kind: type, default: Any = ...) -> Any:
        if name not in self.c or self.c[name] is None:
            if default is ...:
                model_type = self.c.get("model_type", "?")
                raise CheckpointError(f"{self.where}: missing field {name!r} (needed for {model_type})")
            return default
        v = self.c[name]
        ok = isinstance(v, (int, float) if kind is float else kind) and not (
            kind is not bool and isinstance(v, bool))
        if not ok:
            raise CheckpointError(f"{self.where}: field {name!r} should be {kind.__name__}, got {v!r}")
        return v

    def first(self, names: tuple[str, ...], kind: type) -> Any:
        """The first of `names` that is set (HF spells some fields differently by version)."""
        for name in names:
            if self.c.get(name) is not None:
                return self.get(name, kind)
        raise CheckpointError(f"{self.where}: missing field {names[0]!r} (needed for "
                              f"{self.c.get('model_type', '?')})")


def _mixtral(f: _Fields):
    moe = {"hidden_size": f.get("hidden_size", int), "moe_intermediate_size": f.get("intermediate_size", int),
           "n_routed_experts": f.get("num_local_experts", int),
           "num_experts_per_tok": f.get("num_experts_per_tok", int),
           "norm_topk_prob": True}  # Mixtral always renormalises its top-k
    return moe, lambda L: True


def _olmoe(f: _Fields):
    moe = {"hidden_size": f.get("hidden_size", int), "moe_intermediate_size": f.get("intermediate_size", int),
           "n_routed_experts": f.get("num_experts", int),
           "num_experts_per_tok": f.get("num_experts_per_tok", int),
           "norm_topk_prob": f.get("norm_topk_prob", bool, False)}
    return moe, lambda L: True


def _qwen(f: _Fields):
    moe = {"hidden_size": f.get("hidden_size", int),
           "moe_intermediate_size": f.get("moe_intermediate_size", int),
           # transformers 5 writes Qwen3-MoE's count as num_local_experts
           "n_routed_experts": f.first(("num_experts", "num_local_experts"), int),
           "num_experts_per_tok": f.get("num_experts_per_tok", int),
           "norm_topk_prob": f.get("norm_topk_prob", bool, False)}
    if f.c.get("model_type") == "qwen2_moe":
        moe["shared_expert_intermediate_size"] = f.get("shared_expert_intermediate_size", int)
    step = f.get("decoder_sparse_step", int, 1)
    dense = set(f.get("mlp_only_layers", list, []))
    if step < 1:
        raise CheckpointError(f"{f.where}: field 'decoder_sparse_step' must be >= 1, got {step}")
    return moe, lambda L: L not in dense and (L + 1) % step == 0


def _deepseek(f: _Fields, v3: bool):
    moe = {"hidden_size": f.get("hidden_size", int),
           "moe_intermediate_size": f.get("moe_intermediate_size", int),
           "n_routed_experts": f.get("n_routed_experts", int),
           "num_experts_per_tok": f.get("num_experts_per_tok", int),
           "n_shared_experts": f.get("n_shared_experts", int, 0),
           "n_group": f.get("n_group", int, 1), "topk_group": f.get("topk_group", int, 1),
           "routed_scaling_factor": float(f.get("routed_scaling_factor", float, 1.0)),
           # DeepSeek's own code renormalises when this is set; transformers 5's V2 ignores it
           # (every released V2 config has it false)
           "norm_topk_prob": f.get("norm_topk_prob", bool, False)}
    # V3 always scores with a sigmoid and selects with the bias (noaux_tc); V2 with a softmax
    fixed = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"} if v3 else {"scoring_func": "softmax"}
    for name, value in fixed.items():
        if f.get(name, str, value) != value:
            raise CheckpointError(f"{f.where}: field {name!r} is {f.c[name]!r}; "
                                  f"{f.c['model_type']} uses {value!r}")
    moe.update(fixed)
    if not v3:
        moe["topk_method"] = f.get("topk_method", str, "greedy")
    first_dense = f.get("first_k_dense_replace", int, 0)
    freq = f.get("moe_layer_freq", int, 1)
    if freq < 1:
        raise CheckpointError(f"{f.where}: field 'moe_layer_freq' must be >= 1, got {freq}")
    return moe, lambda L: L >= first_dense and L % freq == 0


_FIELDS = {
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "qwen2_moe": _qwen,
    "qwen3_moe": _qwen,
    "deepseek_v2": lambda f: _deepseek(f, v3=False),
    "deepseek_v3": lambda f: _deepseek(f, v3=True),
}


def _fp8_block(f: _Fields) -> tuple[int, int] | None:
    q = f.c.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        return None
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{f.where}: quantization_config.weight_block_size should be two "
                              f"positive ints, got {block!r}")
    return block[0], block[1]
