"""Reading an HF MoE checkpoint directory: `config.json` plus one or many safetensors files.

    CheckpointSource(dir, dtype).expert(L, e) / .gate(L) / .shared(L)

Serves the same calls as the other weight sources, for every family in `hf_config`:
- single-file (`model.safetensors`) or sharded (`model.safetensors.index.json`) checkpoints;
- per-expert tensors (`experts.{e}.gate_proj.weight`, Mixtral's `w1/w3/w2`) or the
  transformers-v5 fused layout (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`),
  detected per layer;
- block-quantised FP8 weights (DeepSeek's `weight_scale_inv`), dequantised on load.

Every read opens only the shards that hold the keys it needs (`safe_open`, memory-mapped),
and a fused tensor is sliced to the one expert asked for, so a host touches only its own
experts. `check` validates every key and shape a set of layers needs from the files' headers
alone, before anything is loaded. dtype conversion is explicit: tensors come back in
`dtype`, except the router's, which stay fp32.

# E = routed experts, H = hidden, I = expert intermediate, Is = shared intermediate
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from moefleet.core.dtypes import TORCH_DTYPES

from .hf_config import CheckpointError, HFConfig, read_config
from .reference import ExpertWeights, GateWeights, SharedExperts

__all__ = ["CheckpointSource", "CheckpointError"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class _Want(NamedTuple):
    """One tensor to read: `key` of `shape`; for a fused tensor [E, ...], the slice of
    `expert` (and of a gate_up_proj, `half` 0 = gate_proj or 1 = up_proj of its rows)."""

    key: str
    shape: tuple[int, ...]
    expert: int | None = None
    half: int | None = None


@dataclass(frozen=True)
class CheckpointSource:
    """The MoE weights of the HF checkpoint directory `path`, served in `dtype`. Plain data:
    hosts get it as {"checkpoint": {"path": ..., "dtype": ...}} and read their own experts."""

    path: str
    dtype: str = "float32"

    # ---- what the service asks for ---------------------------------------------------------

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        e = self.config.moe["n_routed_experts"]
        if not 0 <= expert < e:
            raise CheckpointError(f"{self.path}: layer {layer} has experts 0..{e - 1}, not {expert}")
        w1, w3, w2 = self._read(self._expert_wants(layer, expert))
        return ExpertWeights(w1, w2, w3)

    def gate(self, layer: int) -> GateWeights:
        wants = self._gate_wants(layer)
        weight, *bias = self._read(wants, dtype=torch.float32)
        return GateWeights(weight, bias[0] if bias else None)

    def shared(self, layer: int) -> SharedExperts | None:
        wants = self._shared_wants(layer)
        if not wants:
            return None
        w1, w3, w2, *gate = self._read(wants)
        return SharedExperts(ExpertWeights(w1, w2, w3), gate[0] if gate else None)

    def check(self, layers: list[int]) -> int:
        """Validate every tensor `layers` need (presence, shape, FP8 scales) from the
        headers alone; return the bytes the routed experts take on disk."""
        wants: dict[str, _Want] = {}  # one per key: a fused tensor is checked once, whole
        for L in layers:
            for w in self._gate_wants(L) + self._shared_wants(L):
                wants[w.key] = w
            for e in range(self.config.moe["n_routed_experts"]):
                for w in self._expert_wants(L, e):
                    wants.setdefault(w.key, w)
        nbytes = 0
        with _Shards(self) as shards:
            for w in wants.values():
                sl = shards[w.key].get_slice(w.key)
                shape = self._check_shape(w, sl.get_shape())
                if sl.get_dtype().startswith("F8_"):
                    scale_key, scale_shape = self._scale_of(w.key, shape)
                    self._check_shape(_Want(scale_key, scale_shape),
                                      shards[scale_key].get_slice(scale_key).get_shape())
                if ".experts." in w.key:
                    nbytes += _numel(shape) * _ITEMSIZE.get(sl.get_dtype(), 4)
        return nbytes

    # ---- the checkpoint ---------------------------------------------------------------------

    @cached_property
    def config(self) -> HFConfig:
        return read_config(self.path)

    @property
    def moe_layers(self) -> list[int]:
        return self.config.moe_layers

    @cached_property
    def _index(self) -> dict[str, str]:
        """key -> the file that holds it."""
        root = Path(self.path)
        try:
            if (root / _INDEX).exists():
                weight_map = json.loads((root / _INDEX).read_text()).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{root / _INDEX}: no 'weight_map' object")
                return {k: str(root / v) for k, v in weight_map.items()}
            if (root / _SINGLE).exists():
                with _opened(str(root / _SINGLE)) as f:
                    return dict.fromkeys(f.keys(), str(root / _SINGLE))
        except OSError as e:
            raise CheckpointError(f"checkpoint {self.path!r} is not readable on {socket.gethostname()}: "
                                  f"{e}") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{root / _INDEX}: not valid JSON: {e}") from None
        raise CheckpointError(f"checkpoint {self.path!r}: neither {_SINGLE} nor {_INDEX} found")

    def _block(self, layer: int) -> str:
        """The layer's MoE block prefix: the first of the family's names with a gate."""
        if layer not in self.config.moe_layers:
            raise CheckpointError(f"{self.path}: layer {layer} is not an MoE layer of this "
                                  f"{self.config.model_type} (MoE layers: {self.config.moe_layers})")
        names = [f"model.layers.{layer}.{b}" for b in self.config.family.blocks]
        for p in names:
            if f"{p}.gate.weight" in self._index:
                return p
        raise CheckpointError(f"{self.path}: missing tensor {names[0] + '.gate.weight'!r} "
                              f"(the router of MoE layer {layer})")

    # ---- which tensors, of which shapes -----------------------------------------------------

    def _gate_wants(self, layer: int) -> list[_Want]:
        m, p = self.config.moe, self._block(layer)
        wants = [_Want(f"{p}.gate.weight", (m["n_routed_experts"], m["hidden_size"]))]
        bias = f"{p}.gate.e_score_correction_bias"
        if bias in self._index or m.get("topk_method") == "noaux_tc":
            wants.append(_Want(bias, (m["n_routed_experts"],)))
        return wants

    def _expert_wants(self, layer: int, expert: int) -> list[_Want]:
        """(gate_proj w1, up_proj w3, down_proj w2): per-expert keys, or slices of fused ones."""
        m, p = self.config.moe, self._block(layer)
        h, i = m["hidden_size"], m["moe_intermediate_size"]
        fused = f"{p}.experts.gate_up_proj"
        if fused in self._index:
            return [_Want(fused, (2 * i, h), expert, 0), _Want(fused, (2 * i, h), expert, 1),
                    _Want(f"{p}.experts.down_proj", (h, i), expert)]
        g, u, d = self.config.family.ffn
        q = f"{p}.experts.{expert}"
        return [_Want(f"{q}.{g}.weight", (i, h)), _Want(f"{q}.{u}.weight", (i, h)),
                _Want(f"{q}.{d}.weight", (h, i))]

    def _shared_wants(self, layer: int) -> list[_Want]:
        fam, m = self.config.family, self.config.moe
        inter = self.config.shared_intermediate_size
        if not (fam.shared and inter):
            return []
        block, h = self._block(layer), m["hidden_size"]
        p = f"{block}.{fam.shared}"
        wants = [_Want(f"{p}.gate_proj.weight", (inter, h)), _Want(f"{p}.up_proj.weight", (inter, h)),
                 _Want(f"{p}.down_proj.weight", (h, inter))]
        if fam.shared_gate:
            wants.append(_Want(f"{block}.shared_expert_gate.weight", (1, h)))
        return wants

    def _scale_of(self, key: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, int]]:
        """The FP8 tensor `key`'s weight_scale_inv: its key and shape [ceil(out/bo), ceil(in/bi)]."""
        block = self.config.fp8_block
        if block is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} is FP8 but config.json has no fp8 "
                                  "quantization_config (weight_block_size)")
        if len(shape) != 2:
            raise CheckpointError(f"{self.path}: tensor {key!r} is FP8 in the fused layout; only "
                                  "per-expert FP8 tensors (DeepSeek's weight_scale_inv) are supported")
        return (key.removesuffix(".weight") + ".weight_scale_inv",
                (-(-shape[0] // block[0]), -(-shape[1] // block[1])))

    # ---- reading ------------------------------------------------------------------------------

    def _read(self, wants: list[_Want], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """The tensors `wants` name: checked, dequantised, converted; each shard opened once."""
        dtype = dtype or TORCH_DTYPES[self.dtype]
        out, cache = [], {}
        with _Shards(self) as shards:
            for w in wants:
                at = (w.key, w.expert)
                if at not in cache:  # gate_proj and up_proj share one slice of gate_up_proj
                    sl = shards[w.key].get_slice(w.key)
                    self._check_shape(w, sl.get_shape())
                    t = sl[w.expert] if w.expert is not None else shards[w.key].get_tensor(w.key)
                    cache[at] = self._dequantize(shards, w.key, t) if t.dtype in _FP8 else t
                t = cache[at]
                if w.half is not None:  # [2I, H]: gate_proj rows first, then up_proj
                    t = t.chunk(2, dim=0)[w.half]
                out.append(t.to(dtype).contiguous())
        return out

    def _dequantize(self, shards: _Shards, key: str, w: torch.Tensor) -> torch.Tensor:
        """w: [out, in] FP8 -> w · scale_inv of its [bo, bi] block, fp32."""
        scale_key, scale_shape = self._scale_of(key, tuple(w.shape))
        f = shards[scale_key]
        self._check_shape(_Want(scale_key, scale_shape), f.get_slice(scale_key).get_shape())
        s = f.get_tensor(scale_key).float()  # [ceil(out/bo), ceil(in/bi)]
        bo, bi = self.config.fp8_block
        s = s.repeat_interleave(bo, 0)[: w.shape[0]].repeat_interleave(bi, 1)[:, : w.shape[1]]  # [out, in]
        return w.float() * s

    def _check_shape(self, w: _Want, got) -> tuple[int, ...]:
        """Raise unless the stored shape is what config.json implies; return it."""
        got = tuple(got)
        want = w.shape if w.expert is None else (self.config.moe["n_routed_experts"], *w.shape)
        if got != want:
            m = self.config.moe
            dims = ", ".join(f"{k}={m[k]}" for k in _DIMS)
            raise CheckpointError(f"{self.path}: tensor {w.key!r} has shape {list(got)}; config.json "
                                  f"({dims}) implies {list(want)}")
        return got


class _Shards:
    """The open shards of one read, by key: each file opened once, closed on exit."""

    def __init__(self, source: CheckpointSource):
        self._source, self._open = source, {}

    def __enter__(self) -> _Shards:
        return self

    def __getitem__(self, key: str):
        file = self._source._index.get(key)
        if file is None:
            where = _INDEX if (Path(self._source.path) / _INDEX).exists() else _SINGLE
            raise CheckpointError(f"{self._source.path}: missing tensor {key!r} (not in {where})")
        if file not in self._open:
            cm = _opened(file)
            self._open[file] = (cm, cm.__enter__())
        return self._open[file][1]

    def __exit__(self, *exc) -> None:
        for cm, _ in self._open.values():
            cm.__exit__(None, None, None)


class _opened:
    """`safe_open`, with unreadable, truncated or corrupt files as CheckpointErrors."""

    def __init__(self, file: str):
        self.file = file

    def __enter__(self):
        try:
            self._cm = safe_open(self.file, framework="pt")
            return self._cm.__enter__()
        except SafetensorError as e:
            raise CheckpointError(f"{self.file}: not a readable safetensors file (truncated or "
                                  f"corrupt?): {e}") from None
        except OSError as e:
            raise CheckpointError(f"{self.file} is not readable on {socket.gethostname()}: {e}") from None

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


_DIMS = ("hidden_size", "moe_intermediate_size", "n_routed_experts")
_ITEMSIZE = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
