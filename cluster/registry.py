"""The Controller's registry as plain data: models, logical experts (with their gate rows),
published replicas, target replica counts and hosts, and their snapshot for the journal.

No Ray and no effects: the Controller and its executor own the actors and carry changes out;
this module only records them, builds each layer's `Gate` from its experts' rows, checks a
new expert's file and a removal against the model, turns a poll of the routers into each
model's smoothed tokens/s and latency, and answers the questions placement, the policy and
`status` ask (which host holds what, where a slot is free).

# H = hidden, E = experts of a layer
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from moefleet.core.dtypes import TORCH_DTYPES
from moefleet.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    quote,
)
from moefleet.experts.reference import ExpertWeights, SharedExperts
from moefleet.router.gating import Gate

from . import autoscale
from .autoscale import AutoscalingConfig
from .model import gate_of, source_of
from .spec import ModelSpec

__all__ = ["Key", "ExpertRecord", "HostRecord", "ModelRecord", "check_removable",
           "check_new_expert_id", "check_replica_counts", "check_rebalance_total", "parse_new_expert",
           "policy_to_plain", "policy_from_plain", "MAX_EXPERT_ID"]

Key = tuple[int, int]  # (layer, expert id)
MAX_EXPERT_ID = 4095  # expert ids are 0 … MAX_EXPERT_ID: routing tables are indexed by id


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
    tokens_per_s: dict[Key, float] = field(default_factory=dict)  # smoothed (autoscale.smooth)
    latency: dict[str, float] = field(default_factory=dict)  # p50_s, p99_s, requests_per_s

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ModelRecord:
        """The model as its spec serves it at first: every expert's row from the gate."""
        experts, src = {}, source_of(spec)
        for L in spec.layers:
            g = gate_of(spec, L, src)
            bias = [None] * len(g.expert_ids) if g.bias is None else g.bias.tolist()
            experts[L] = {int(e): ExpertRecord(g.weight[i], bias[i], int(g.group_ids[i]))
                          for i, e in enumerate(g.expert_ids.tolist())}
        return cls(spec, experts, {L: src.shared(L) for L in spec.layers}, spec.autoscaling)

    @classmethod
    def from_plain(cls, d: dict[str, Any]) -> tuple[ModelRecord, dict[Key, ExpertWeights]]:
        """The inverse of `to_plain`; also the FFN weights of the experts added at runtime,
        read back from their files."""
        m = cls.from_spec(ModelSpec.from_dict(d["spec"]))
        m.version, m.next_host = d["version"], d["next_host"]
        m.autoscaling = AutoscalingConfig(**d["autoscaling"])
        for L, e in d["removed"]:
            m.experts[L].pop(e, None)
        weights = {}
        for L, e, group, file in d["added"]:
            with open(file, "rb") as f:
                rec, weights[(L, e)] = parse_new_expert(m.spec, f.read(), group)
            rec.file = file
            m.experts[L][e] = rec
        m.target = {(L, e): n for L, e, n in d["target"]}
        for L, e, h, s in d["replicas"]:
            m.replicas.setdefault((L, e), []).append((h, s))
        m.tokens_per_s = {(L, e): v for L, e, v in d.get("tokens_per_s", d.get("load", []))}
        return m, weights

    @property
    def name(self) -> str:
        return self.spec.name

    def observe(self, replies: list[dict[str, Any]], elapsed_s: float) -> None:
        """One poll of the routers (each reply `Router.take_rows`'s): this model's rows per
        expert over `elapsed_s` become its smoothed `tokens_per_s`, its request latencies `latency`."""
        rows: dict[Key, float] = {}
        lat: list[float] = []
        for r in replies:
            for L, per in r["rows"].get(self.name, {}).items():
                for e, n in per.items():
                    rows[(L, e)] = rows.get((L, e), 0.0) + n
            lat.extend(r["latency_s"].get(self.name, []))
        keys = self.keys()
        rate = np.array([rows.get(k, 0.0) for k in keys]) / elapsed_s
        old = np.array([self.tokens_per_s.get(k, np.nan) for k in keys])
        smoothed = autoscale.smooth(self.autoscaling.smoothing, rate, old)
        self.tokens_per_s = dict(zip(keys, smoothed.tolist(), strict=True))
        self.latency = _latency_summary(lat, elapsed_s)

    def status(self) -> dict[str, Any]:
        """The model as plain data (its part of what `moefleet status` shows)."""
        layers = []
        for L in sorted(self.experts):
            experts = [{"expert": e, "group": r.group,
                        "replicas": [{"host": h, "slot": s} for h, s in self.replicas.get((L, e), [])],
                        "tokens_per_s": self.tokens_per_s.get((L, e), 0.0),
                        "target_replicas": self.target.get((L, e), 0)}
                       for e, r in sorted(self.experts[L].items())]
            layers.append({"layer": L, "experts": experts})
        a = self.autoscaling
        return {"name": self.name, "routing_version": self.version, "dtype": self.spec.dtype,
                "hidden_size": self.spec.moe.hidden_size, "layers": layers,
                "autoscaling": {k: getattr(a, k) for k in _AUTOSCALING_FIELDS},
                "latency_p50_s": self.latency.get("p50_s", 0.0),
                "latency_p99_s": self.latency.get("p99_s", 0.0),
                "requests_per_s": self.latency.get("requests_per_s", 0.0)}

    def layer(self, layer: int) -> dict[int, ExpertRecord]:
        """The layer's experts by id; NotFound for a layer the model does not have."""
        if layer not in self.experts:
            raise NotFound(f"model {self.name!r} has no MoE layer {layer}; "
                           f"layers: {sorted(self.experts)}")
        return self.experts[layer]

    def expert(self, layer: int, expert: int) -> ExpertRecord:
        if expert not in self.layer(layer):
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
        return max(self.layer(layer), default=-1) + 1

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
            "tokens_per_s": [[L, e, v] for (L, e), v in self.tokens_per_s.items()],
        }


def check_new_expert_id(model: ModelRecord, layer: int, expert: int) -> None:
    """Refuse an id an added expert cannot take: taken, or outside 0 … MAX_EXPERT_ID."""
    if expert in model.layer(layer):  # also NotFound for an unknown layer
        raise AlreadyExists(f"model {model.name!r} layer {layer} already has expert {expert}")
    if not 0 <= expert <= MAX_EXPERT_ID:
        raise InvalidArgument(f"expert ids are 0 … {MAX_EXPERT_ID}, got {expert}")


def check_replica_counts(model: ModelRecord, counts: dict[Key, int]) -> None:
    """Refuse replica counts the model's hosts could never hold, before anything changes.

    Replicas of one expert sit on distinct hosts, so one expert has at most hosts.max_count;
    and every expert's replicas together need at most hosts.max_count × hosts.slots slots."""
    hosts = model.spec.hosts
    for (L, e), n in counts.items():
        if not 1 <= n <= hosts.max_count:
            raise InvalidArgument(
                f"replicas of layer {L} expert {e} must be 1 … {hosts.max_count} (hosts.max_count: "
                f"replicas of one expert sit on distinct hosts), got {n}")
    total = sum({**{k: len(model.replicas.get(k, [])) for k in model.keys()}, **model.target,
                 **counts}.values())
    if total > hosts.max_count * hosts.slots:
        raise FailedPrecondition(
            f"{total} replicas in all would need more slots than hosts.max_count × hosts.slots "
            f"({hosts.max_count} × {hosts.slots} = {hosts.max_count * hosts.slots})")


def check_rebalance_total(model: ModelRecord, replicas: int) -> None:
    """Refuse a rebalance total outside 0 (keep the current one) or one per expert … what
    the model's hosts could ever hold (hosts.max_count of them; one expert's replicas sit on
    distinct hosts). A total the hosts running now cannot hold is the planner's to report."""
    if replicas == 0:
        return
    n, hosts = len(model.keys()), model.spec.hosts
    most = hosts.max_count * min(n, hosts.slots)
    if not n <= replicas <= most:
        raise InvalidArgument(f"rebalance replicas must be 0 (keep the current total) or {n} (one per "
                              f"expert) … {most} (what hosts.max_count = {hosts.max_count} hosts of "
                              f"{hosts.slots} slots could hold), got {replicas}")


def rebalance_knob(model: ModelRecord, max_moves: int | None, min_gain: float | None) -> tuple[int, float]:
    """The rebalance knob, unset parts from the spec's autoscaling.rebalance_*; refused unless
    max_moves >= 0 (0: no limit) and min_gain is finite and >= 0 (an infinite one makes the
    planner's score of a plan with no moves inf · 0, not a number)."""
    a = model.autoscaling
    max_moves = a.rebalance_max_moves if max_moves is None else max_moves
    min_gain = a.rebalance_min_gain if min_gain is None else min_gain
    if max_moves < 0 or not 0 <= min_gain < math.inf:
        raise InvalidArgument(f"rebalance needs max_moves >= 0 and a finite min_gain >= 0, "
                              f"got {max_moves}, {min_gain}")
    return max_moves, min_gain


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
    if cfg.group_limited:
        sizes = sorted(sum(1 for r in rest if r.group == g) for g in range(cfg.n_group))
        worst = sum(sorted(s for s in sizes if s > 0)[:cfg.topk_group])
        if worst < k:
            raise FailedPrecondition(
                f"removing expert {expert} leaves layer {layer}'s {cfg.topk_group} smallest "
                f"groups with {worst} experts; num_experts_per_tok is {k}")


def parse_new_expert(spec: ModelSpec, data: bytes, group: int | None) -> tuple[ExpertRecord, ExpertWeights]:
    """Validate an AddExpert file against the model; its gate record and FFN weights."""
    cfg = spec.moe
    try:
        t = load_safetensors(data)
    except Exception as e:
        raise InvalidArgument(f"the expert file is not a readable safetensors file: {e}") from None
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    want = {"gate.weight": (1, h), "gate_proj.weight": (inter, h), "up_proj.weight": (inter, h),
            "down_proj.weight": (h, inter)}
    bias_key = "gate.e_score_correction_bias"
    unknown = sorted(set(t) - set(want) - {bias_key})
    if unknown:  # a misspelt name would otherwise be dropped without a word (a bias: taken as 0)
        raise InvalidArgument(f"the expert file has tensors moefleet does not take: "
                              f"{quote(', '.join(unknown))}; it takes {sorted(want)} and {bias_key!r}")
    for key, shape in want.items():
        if key not in t:
            raise InvalidArgument(f"the expert file has no tensor {key!r}; it needs {sorted(want)}")
        if tuple(t[key].shape) != shape:
            raise InvalidArgument(f"{key} has shape {list(t[key].shape)}; model {spec.name!r} "
                                  f"needs {list(shape)}")
    for key in [*want, bias_key]:
        if key in t and not t[key].is_floating_point():  # integer weights need scales moefleet lacks
            raise InvalidArgument(f"{key} is {str(t[key].dtype).removeprefix('torch.')}; "
                                  f"expert tensors must be floating point")
    biased = cfg.topk_method == "noaux_tc"
    if bias_key in t and not biased:
        raise InvalidArgument(f"{bias_key} given, but model {spec.name!r} "
                              f"(topk_method {cfg.topk_method}) has no selection bias")
    if bias_key in t and tuple(t[bias_key].shape) != (1,):
        raise InvalidArgument(f"{bias_key} has shape {list(t[bias_key].shape)}; it needs [1]")
    if bias_key in t and not torch.isfinite(t[bias_key].float()).all():
        raise InvalidArgument(f"{bias_key} holds a non-finite value")
    bias = float(t[bias_key][0]) if bias_key in t else (0.0 if biased else None)
    grouped = cfg.group_limited
    if grouped and group is None:
        raise InvalidArgument(f"model {spec.name!r} routes by group (n_group {cfg.n_group}): "
                              f"name the new expert's group")
    g = 0 if group is None else group
    if not 0 <= g < (cfg.n_group if grouped else 1):
        raise InvalidArgument(f"group {g} is outside 0..{(cfg.n_group if grouped else 1) - 1}")
    dt = TORCH_DTYPES[spec.dtype]
    cast = {key: t[key].to(dt) for key in want}
    for key, x in cast.items():  # after the cast: a value past the model dtype's range becomes inf
        if not torch.isfinite(x).all():
            raise InvalidArgument(f"{key} holds non-finite values"
                                  + (f" once cast to {spec.dtype}" if torch.isfinite(t[key]).all() else ""))
    weights = ExpertWeights(cast["gate_proj.weight"], cast["down_proj.weight"], cast["up_proj.weight"])
    return ExpertRecord(cast["gate.weight"][0], bias, g), weights


def policy_to_plain(p: autoscale.PolicyState) -> dict[str, Any]:
    return {"pending": [[L, e, n, t] for (L, e), (n, t) in p.pending.items()],
            "host_empty_since": dict(p.host_empty_since)}


def policy_from_plain(d: dict[str, Any]) -> autoscale.PolicyState:
    # an older journal's "smoothed" rates are dropped: the model's own `load` refills in one period
    return autoscale.PolicyState({(L, e): (n, t) for L, e, n, t in d["pending"]},
                                 dict(d["host_empty_since"]))


_AUTOSCALING_FIELDS = ("enabled", "target_tokens_per_s", "min_replicas", "max_replicas",
                       "upscale_delay_s", "downscale_delay_s")


def _latency_summary(lat: list[float], elapsed_s: float) -> dict[str, float]:
    if not lat:
        return {"p50_s": 0.0, "p99_s": 0.0, "requests_per_s": 0.0}
    s = sorted(lat)
    pick = lambda q: s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]  # noqa: E731
    return {"p50_s": pick(0.5), "p99_s": pick(0.99), "requests_per_s": len(s) / elapsed_s}
