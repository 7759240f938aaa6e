"""The oracle the service is tested, benchmarked and demonstrated against, and the experts
that tests add at runtime. Not used by the service itself (a unit test holds that).

`Reference` is the monolithic in-process MoE layers of a spec as served at first: the
router's gating with the reference expert maths. `VersionedReference` is that oracle for a
service whose experts were added and removed at runtime, one routing version at a time.

# T = tokens, H = hidden, I = expert intermediate size, E = routed experts
"""

from __future__ import annotations

import torch
from safetensors.torch import save

from moefleet.cluster.model import gate_of, source_of
from moefleet.cluster.spec import ModelSpec
from moefleet.experts.reference import ExpertWeights, MoELayer
from moefleet.router.gating import Gate, route

__all__ = ["Reference", "VersionedReference", "random_expert", "expert_file"]


def expert_file(gate_row: torch.Tensor, w: ExpertWeights, bias: float | None = None) -> bytes:
    """The safetensors file AddExpert takes (`moefleet add-expert --weights`): gate row [H],
    optional selection bias, and the FFN in HF names (gate_proj = w1, up_proj = w3,
    down_proj = w2). `registry.parse_new_expert` reads it back."""
    tensors = {"gate.weight": gate_row[None].contiguous(), "gate_proj.weight": w.w1.contiguous(),
               "up_proj.weight": w.w3.contiguous(), "down_proj.weight": w.w2.contiguous()}
    if bias is not None:
        tensors["gate.e_score_correction_bias"] = torch.tensor([bias])
    return save(tensors)


def random_expert(spec: ModelSpec, seed: int, gate_scale: float = 1.0
                  ) -> tuple[torch.Tensor, float | None, ExpertWeights]:
    """A new random expert for `spec`: (gate row [H], selection bias or None, weights). A
    gate_scale > 1 makes tokens pick it more often than the spec's experts."""
    g = torch.Generator().manual_seed(seed)
    h, inter = spec.moe.hidden_size, spec.moe.moe_intermediate_size
    row = gate_scale * torch.randn(h, generator=g) / h**0.5  # [H]
    w = ExpertWeights(torch.randn(inter, h, generator=g) / h**0.5,  # w1 [I, H]
                      torch.randn(h, inter, generator=g) / inter**0.5,  # w2 [H, I]
                      torch.randn(inter, h, generator=g) / h**0.5)  # w3 [I, H]
    bias = 0.05 if spec.moe.topk_method == "noaux_tc" else None
    return row, bias, w



class Reference:
    """The monolithic in-process MoE layers of a spec: the oracle and the baseline."""

    def __init__(self, spec: ModelSpec):
        src = source_of(spec)
        self.spec = spec
        self.gates = {L: gate_of(spec, L, src) for L in spec.layers}
        self.layers = {
            L: MoELayer({e: src.expert(L, e) for e in range(spec.moe.n_routed_experts)},
                        src.shared(L))
            for L in spec.layers
        }

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]"""
        topk_w, topk_ids = route(x, self.gates[layer], self.spec.moe)
        return self.layers[layer](x, topk_w, topk_ids)


class VersionedReference:
    """The reference of each routing version: the spec's experts, plus those added and minus
    those removed by changes published at or before that version (as AddExpert/RemoveExpert
    report them)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.base = Reference(spec)
        self._changes: list[tuple[int, int, int, tuple | None]] = []  # (version, layer, id, add)

    def added(self, version: int, layer: int, expert: int, gate_row: torch.Tensor,
              weights: ExpertWeights, bias: float | None = None, group: int = 0) -> None:
        """gate_row: [H]"""
        self._changes.append((version, layer, expert, (gate_row, bias, group, weights)))

    def removed(self, version: int, layer: int, expert: int) -> None:
        self._changes.append((version, layer, expert, None))

    def __call__(self, version: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H] as routing version `version` computes it."""
        gate, experts = self._at(version, layer)
        topk_w, topk_ids = route(x, gate, self.spec.moe)
        return MoELayer(experts, self.base.layers[layer].shared)(x, topk_w, topk_ids)

    def route(self, version: int, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (topk_w [T, K], topk_ids [T, K]) as routing version `version` routes."""
        return route(x, self._at(version, layer)[0], self.spec.moe)

    def _at(self, version: int, layer: int) -> tuple[Gate, dict[int, ExpertWeights]]:
        g, base = self.base.gates[layer], self.base.layers[layer]
        bias = [None] * len(g.expert_ids) if g.bias is None else g.bias.tolist()
        rows = {e: (g.weight[i], bias[i], int(g.group_ids[i])) for i, e in enumerate(g.expert_ids.tolist())}
        experts = dict(base.experts)
        for v, L, e, add in self._changes:
            if v > version or L != layer:
                continue
            if add is None:
                rows.pop(e)
                experts.pop(e)
            else:
                rows[e], experts[e] = add[:3], add[3]
        ids = sorted(rows)
        gate = Gate(torch.stack([rows[e][0] for e in ids]), torch.tensor(ids),  # [E, H], [E]
                    torch.tensor([rows[e][2] for e in ids]),
                    None if g.bias is None else torch.tensor([rows[e][1] or 0.0 for e in ids]))
        return gate, experts
