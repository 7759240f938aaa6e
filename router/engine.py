"""The router's request path for one MoE layer: gate, plan, fan out, combine.

`Engine.forward` is the whole hot path. It captures the model's current `ModelState` (one
routing-table version) once, so a request runs on the version it started with, even while a
new version is installed. Hosts are reached through an injected `call_host` coroutine, so
the engine runs against Ray actors in the service and against plain objects in tests.

Knows nothing of gRPC, and nothing of how experts compute beyond the shared-expert FFN.

# T = tokens, H = hidden, K = experts per token, N = T·K dispatched rows
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from moefleet.cluster.spec import MoEConfig
from moefleet.experts.reference import SharedExperts

from .dispatch import HostBatch, LayerTable, combine, plan
from .errors import InvalidArgument, NotFound, Unavailable
from .gating import Gate, route

__all__ = ["LayerState", "ModelState", "Engine", "CallHost"]

# call_host(host, x [n, H], batch) -> awaitable y [n, H]; it should start the host's work
# before returning, so all hosts and the router's shared experts run at the same time.
CallHost = Callable[[Any, torch.Tensor, HostBatch], Awaitable[torch.Tensor]]


@dataclass(frozen=True)
class LayerState:
    gate: Gate
    table: LayerTable
    shared: SharedExperts | None = None


@dataclass(frozen=True)
class ModelState:
    """Everything a request needs, for one routing-table version. Never mutated."""

    name: str
    cfg: MoEConfig
    dtype: torch.dtype
    version: int
    layers: dict[int, LayerState]
    hosts: list[Any]  # indexed by the host numbers in each LayerTable


class Engine:
    def __init__(self, call_host: CallHost, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._call_host = call_host
        self._models: dict[str, ModelState] = {}

    def install(self, state: ModelState) -> None:
        """Swap in a new version; requests already running keep the one they captured."""
        layers = {
            i: LayerState(ls.gate.to(self.device), ls.table, _to_device(ls.shared, self.device))
            for i, ls in state.layers.items()
        }
        self._models[state.name] = ModelState(
            state.name, state.cfg, state.dtype, state.version, layers, state.hosts
        )

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def state(self, model: str) -> ModelState:
        try:
            return self._models[model]
        except KeyError:
            raise NotFound(f"unknown model {model!r}; serving {sorted(self._models)}") from None

    def check(self, model: str, layer: int, x: torch.Tensor) -> None:
        """Raise the right domain error for a request this engine cannot serve."""
        st = self.state(model)
        if x.dim() != 2:
            raise InvalidArgument(f"hidden_states must have shape [T, H], got {list(x.shape)}")
        if layer not in st.layers:
            raise NotFound(f"model {model!r} has no MoE layer {layer}; layers: {sorted(st.layers)}")
        if x.shape[1] != st.cfg.hidden_size:
            raise InvalidArgument(
                f"hidden_states has hidden size {x.shape[1]}; model {model!r} expects "
                f"{st.cfg.hidden_size}"
            )

    async def forward(self, model: str, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x: [T, H] -> (y [T, H] in x's dtype, routing version used)."""
        st = self.state(model)  # the version this request runs on
        self.check(model, layer, x)
        ls = st.layers[layer]
        if x.shape[0] == 0:
            return x.clone(), st.version
        xd = x.to(self.device)
        topk_w, topk_ids = route(xd, ls.gate, st.cfg)  # [T, K], [T, K]
        try:
            p = plan(topk_ids, ls.table)
        except LookupError as e:  # an expert with no ready replica in this version
            raise Unavailable(str(e)) from e
        rows = x.to(st.dtype)[p.tokens(st.cfg.num_experts_per_tok)]  # [N, H] on the CPU
        calls = [self._call_host(st.hosts[b.host], rows[b.start:b.end], b) for b in p.batches]
        out = self._shared(xd, ls.shared)  # overlaps with the hosts' work
        try:
            ys = await asyncio.gather(*calls)
        except (LookupError, ConnectionError) as e:
            raise Unavailable(f"an expert host failed: {e}") from e
        y = torch.cat(ys).to(self.device) if ys else rows.new_zeros(0, x.shape[1])  # [N, H]
        out = combine(y, p, topk_w, x.shape[0], out)
        return out.to(x.dtype).cpu(), st.version

    def _shared(self, x: torch.Tensor, shared: SharedExperts | None) -> torch.Tensor | None:
        if shared is None:
            return None
        return shared(x.to(shared.ffn.w1.dtype)).float()  # [T, H]


def _to_device(shared: SharedExperts | None, device: torch.device) -> SharedExperts | None:
    if shared is None:
        return None
    f = shared.ffn
    ffn = type(f)(f.w1.to(device), f.w2.to(device), f.w3.to(device))
    gate = None if shared.gate is None else shared.gate.to(device)
    return SharedExperts(ffn, gate)
