"""The Controller's registry as plain data: models, logical experts (with their gate rows),
published replicas, target replica counts and hosts, and their snapshot for the journal.

No Ray and no effects: the Controller owns the actors and carries changes out; this module
only records them, builds each layer's `Gate` from its experts' rows, and answers the
questions placement and the policy ask (which host holds what, where a slot is free).

# H = hidden, E = experts of a layer
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moefleet.experts.reference import SharedExperts
from moefleet.router.errors import FailedPrecondition, NotFound, ResourceExhausted
from moefleet.router.gating import Gate

from .autoscale import AutoscalingConfig
from .spec import ModelSpec

__all__ = ["Key", "ExpertRecord", "HostRecord", "ModelRecord", "check_removable"]

Key = tuple[int, int]  # (layer, expert id)


@dataclass
class ExpertRecord:
    """A logical expert: its gate row, selection bias and group; `file` holds the weights of
    an expert added at runtime (None: the spec's weight source makes them)."""

    weight: torch.Tensor  # [H]
    bias: float | None
    group: int
    file: str | None = None


@dataclass
class HostRecord:
    id: str
    model: str
    handle: Any
    info: dict[str, Any]  # id, node_id, node_ip, device, slots_total
    slots: dict[int, Key] = field(default_factory=dict)  # slot -> expert (loading, serving, draining)

    @property
    def slots_total(self) -> int:
        return int(self.info["slots_total"])

    def reserve(self, key: Key) -> int:
        """Take the lowest free slot for `key`."""
        slot = next((s for s in range(self.slots_total) if s not in self.slots), None)
        if slot is None:
            raise ResourceExhausted(f"host {self.id} has no free slot for expert {key}")
        self.slots[slot] = key
        return slot

    def free_slots(self) -> int:
        return self.slots_total - len(self.slots)


@dataclass
class ModelRecord:
    spec: ModelSpec
    experts: dict[int, dict[int, ExpertRecord]]  # layer -> expert id -> record
    shared: dict[int, SharedExperts | None]
    autoscaling: AutoscalingConfig
    replicas: dict[Key, list[tuple[str, int]]] = field(default_factory=dict)  # published (host, slot)
    target: dict[Key, int] = field(default_factory=dict)
    version: int = 0
    next_host: int = 0
    rate: dict[Key, float] = field(default_factory=dict)  # tokens/s over the last poll
    load: dict[Key, float] = field(default_factory=dict)  # tokens/s, smoothed over polls
    latency: dict[str, float] = field(default_factory=dict)  # p50_s, p99_s, requests_per_s

    @property
    def name(self) -> str:
        return self.spec.name

    def expert(self, layer: int, expert: int) -> ExpertRecord:
        if layer not in self.experts:
            raise NotFound(f"model {self.name!r} has no MoE layer {layer}; "
                           f"layers: {sorted(self.experts)}")
        if expert not in self.experts[layer]:
            raise NotFound(f"model {self.name!r} layer {layer} has no expert {expert}; "
                           f"experts: {sorted(self.experts[layer])}")
        return self.experts[layer][expert]

    def keys(self) -> list[Key]:
        return [(L, e) for L in sorted(self.experts) for e in sorted(self.experts[L])]

    def placement(self) -> dict[Key, list[str]]:
        """expert -> ids of the hosts holding its published replicas."""
        return {k: [h for h, _ in self.replicas.get(k, [])] for k in self.keys()}

    def gate(self, layer: int) -> Gate:
        """The layer's router from its experts' rows, in id order."""
        recs = self.experts[layer]
        ids = sorted(recs)
        weight = torch.stack([recs[e].weight for e in ids])  # [E, H]
        bias = None
        if any(recs[e].bias is not None for e in ids):
            bias = torch.tensor([recs[e].bias or 0.0 for e in ids], dtype=torch.float32)  # [E]
        groups = torch.tensor([recs[e].group for e in ids], dtype=torch.long)  # [E]
        return Gate(weight, torch.tensor(ids, dtype=torch.long), groups, bias)

    def next_expert_id(self, layer: int) -> int:
        return max(self.experts[layer], default=-1) + 1

    # ---- journal ------------------------------------------------------------------------

    def to_plain(self) -> dict[str, Any]:
        """What the journal keeps; the spec's own experts are made again from its source."""
        own = set(range(self.spec.moe.n_routed_experts))
        added = [[L, e, r.group, r.file] for L, recs in self.experts.items()
                 for e, r in recs.items() if r.file is not None]
        removed = [[L, e] for L, recs in self.experts.items() for e in own - set(recs)]
        return {
            "spec": self.spec.to_dict(), "version": self.version,
            "next_host": self.next_host, "autoscaling": vars(self.autoscaling).copy(),
            "added": added, "removed": removed,
            "target": [[L, e, n] for (L, e), n in self.target.items()],
            "replicas": [[L, e, h, s] for (L, e), reps in self.replicas.items() for h, s in reps],
        }


def check_removable(model: ModelRecord, layer: int, expert: int) -> None:
    """Refuse a removal that would leave the layer unable to route: top-k needs k experts,
    and with group-limited routing, every choice of kept groups must still hold k."""
    model.expert(layer, expert)
    cfg = model.spec.moe
    rest = [r for e, r in model.experts[layer].items() if e != expert]
    if not rest:
        raise FailedPrecondition(f"expert {expert} is the last expert of layer {layer}")
    k = cfg.num_experts_per_tok
    if len(rest) < k:
        raise FailedPrecondition(f"layer {layer} would keep {len(rest)} experts; "
                                 f"num_experts_per_tok is {k}")
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        sizes = sorted(sum(1 for r in rest if r.group == g) for g in range(cfg.n_group))
        worst = sum(sorted(s for s in sizes if s > 0)[:cfg.topk_group])
        if worst < k:
            raise FailedPrecondition(
                f"removing expert {expert} leaves layer {layer}'s {cfg.topk_group} smallest "
                f"groups with {worst} experts; num_experts_per_tok is {k}")
