"""Swap the sparse MoE blocks of a transformers model for calls to a moefleet service.

    model = AutoModelForCausalLM.from_pretrained(ckpt_dir)
    remote_moe(model, "localhost:50051")       # every sparse block now asks the service
    model.generate(ids, max_new_tokens=20)
    close(model)

Knows: which block class is sparse in each supported family, where a decoder layer keeps it
(`mlp`, or `block_sparse_moe` in older transformers), and that the service computes the whole
block (routed experts, shared experts, Qwen2's sigmoid shared gate) for layer id = the HF
decoder layer index. Attention, norms and dense MLP layers stay local and untouched.
Does not know gating or expert maths (the service does both), nor how to load a model; it is
for inference: no gradient flows through the service's answer.

# B = batch, S = sequence, T = B × S tokens, H = hidden, E = routed experts
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import grpc
import torch
from torch import nn

from moefleet.client import Client

__all__ = ["remote_moe", "close", "RemoteMoE", "SUPPORTED_MODEL_TYPES"]

log = logging.getLogger(__name__)

# model_type -> the class name of its sparse MoE block (matched by name: no transformers import)
_SPARSE_BLOCKS = {
    "mixtral": "MixtralSparseMoeBlock",
    "deepseek_v2": "DeepseekV2Moe",
    "deepseek_v3": "DeepseekV3MoE",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "olmoe": "OlmoeSparseMoeBlock",
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_SPARSE_BLOCKS))
# Where a decoder layer keeps its MoE block; Mixtral called it `block_sparse_moe` before v5.
_BLOCK_ATTRS = ("mlp", "block_sparse_moe")

Infer = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, x [T, H]) -> y [T, H]


class RemoteMoE(nn.Module):
    """Stands in for one sparse MoE block: y = infer(layer, x), x and y [T, H].

    `gate` is the block's own router, kept so that HF's OutputRecorder hook on the router class
    still records `router_logits`; its routing is otherwise unused (the service routes)."""

    def __init__(self, layer: int, gate: nn.Module, infer: Infer):
        super().__init__()
        self.layer = layer
        self.gate = gate
        self.infer = infer
        # transformers < 5: the gate is a bare nn.Linear and the block returns (y, router_logits)
        self._returns_logits = isinstance(gate, nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [B, S, H] -> [B, S, H], the block's output, same dtype and device as x."""
        flat = x.reshape(-1, x.shape[-1])  # [T, H]
        # The router is one [T, H] x [H, E] matmul (plus its top-k): cheap next to a round trip,
        # and calling it is what lets HF's forward hook collect router_logits.
        routed = self.gate(flat)
        y = self.infer(self.layer, flat.detach())  # [T, H]
        y = y.to(device=x.device, dtype=x.dtype).reshape(x.shape)  # [B, S, H]
        if self._returns_logits:
            return y, routed
        return y

    def extra_repr(self) -> str:
        return f"layer={self.layer}"


class _ServiceInfer:
    """The `infer` of every RemoteMoE of one model: one Client, one served model."""

    def __init__(self, client: Client, model_name: str, timeout_s: float | None):
        self.client = client
        self.model_name = model_name
        self.timeout_s = timeout_s

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.client.infer(self.model_name, layer, x, timeout_s=self.timeout_s)

    def close(self) -> None:
        self.client.close()


# ---- swapping ------------------------------------------------------------------------------


def remote_moe(model: nn.Module, address: str, model_name: str | None = None, token: str | None = None,
               timeout_s: float | None = 60.0) -> nn.Module:
    """Replace every sparse MoE block of `model` (in place) by a RemoteMoE that calls the service
    at `address` for layer i = the block's decoder layer index; returns `model`.

    model_name: the served model's name; by default the basename of the checkpoint the model was
    loaded from (the service names a checkpoint after its directory). token: the admin token,
    used only to check, before anything is swapped, that the service serves every layer (skipped
    with a warning when the service refuses Status). timeout_s: the deadline of each layer call."""
    blocks = _sparse_blocks(model)
    name = model_name or _default_name(model)
    client = Client(address, token=token)
    try:
        _check_served(client, address, name, sorted(blocks), model.config.hidden_size)
    except BaseException:
        client.close()
        raise
    infer = _ServiceInfer(client, name, timeout_s)
    for i, (layer, attr, block) in blocks.items():
        setattr(layer, attr, RemoteMoE(i, block.gate, infer))
    return model


def close(model: nn.Module) -> None:
    """Close the service connection(s) of a model swapped by `remote_moe`."""
    for infer in {id(m.infer): m.infer for m in model.modules() if isinstance(m, RemoteMoE)}.values():
        if hasattr(infer, "close"):
            infer.close()


def _sparse_blocks(model: nn.Module) -> dict[int, tuple[nn.Module, str, nn.Module]]:
    """Decoder layer index -> (the layer, the attribute holding its sparse block, the block)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _SPARSE_BLOCKS:
        raise ValueError(f"remote_moe: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if layers is None:
        raise ValueError(f"remote_moe: {type(model).__name__} has no decoder `layers`")
    found, already = {}, []
    for i, layer in enumerate(layers):
        for attr in _BLOCK_ATTRS:
            block = getattr(layer, attr, None)
            if type(block).__name__ == _SPARSE_BLOCKS[model_type]:
                found[i] = (layer, attr, block)
            elif isinstance(block, RemoteMoE):
                already.append(i)
    if already:
        raise ValueError(f"remote_moe: layers {already} are already remote")
    if not found:
        raise ValueError(f"remote_moe: no {_SPARSE_BLOCKS[model_type]} in the {len(layers)} decoder layers")
    return found


def _default_name(model: nn.Module) -> str:
    name = os.path.basename(str(getattr(model.config, "_name_or_path", "")).rstrip("/"))
    if not name:
        raise ValueError("remote_moe: the model was not loaded from a checkpoint; pass model_name")
    return name


def _check_served(client: Client, address: str, name: str, layers: list[int], hidden_size: int) -> None:
    """Raise a ValueError naming what the service at `address` lacks: the model, a layer, the width."""
    try:
        status = client.status(name)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            raise ValueError(f"remote_moe: the service at {address} does not serve a model {name!r}"
                             f"{_served_models(client)}; pass model_name") from None
        if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.UNIMPLEMENTED):
            log.warning("remote_moe: cannot check what %s serves (%s); layers are not checked",
                        address, e.code().name)
            return
        raise
    (served,) = status.models
    missing = sorted(set(layers) - {L.layer for L in served.layers})
    if missing:
        raise ValueError(f"remote_moe: the service at {address} does not serve layer(s) {missing} of "
                         f"{name!r}; it serves {sorted(L.layer for L in served.layers)}")
    if served.hidden_size != hidden_size:
        raise ValueError(f"remote_moe: {name!r} is served with hidden_size {served.hidden_size}, "
                         f"the model has {hidden_size}")


def _served_models(client: Client) -> str:
    try:
        names = [m.name for m in client.status().models]
    except grpc.RpcError:
        return ""
    return f" (it serves {names})"
