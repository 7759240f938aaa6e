"""Gating: which experts each token goes to, and with what weight. Every HF variant.

    scoring_func   softmax (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2) | sigmoid (DeepSeek-V3)
    topk_method    greedy | group_limited_greedy (V2: group score = max) |
                   noaux_tc (V3: bias for selection only, group score = sum of top-2)
    then           optional renormalisation (norm_topk_prob), then routed_scaling_factor

Pure tensor functions: no Ray, no grpc, no knowledge of where experts run. They run on
whatever device the inputs live on (the router's GPU when it has one).

Expert ids need not be contiguous and groups need not be equal in size: a `Gate` carries the
id and the group of each of its rows, so experts can come and go at runtime.

# T = tokens, H = hidden, E = experts in the gate, K = experts per token,
# G = groups, W = the widest group's experts
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moefleet.core.config import MoEConfig

__all__ = ["Gate", "route", "scores"]

_EPS = 1e-20  # the renormalisation guard HF uses


@dataclass(frozen=True)
class Gate:
    """One layer's router weights.

    weight: [E, H]; bias: [E] (e_score_correction_bias, selection only) or None;
    expert_ids: [E] int64, the logical id of each row; group_ids: [E] int64, each row's group.
    """

    weight: torch.Tensor
    expert_ids: torch.Tensor
    group_ids: torch.Tensor
    bias: torch.Tensor | None = None

    def __post_init__(self):
        # Where each row sits in the padded [G, W] group layout; fixed per gate version, so
        # no request pays for it (and no GPU sync happens per request).
        g = self.group_ids
        counts = torch.bincount(g)  # [G]
        starts = torch.cumsum(counts, 0) - counts  # [G]
        order = torch.argsort(g, stable=True)  # [E]
        slot = torch.empty_like(g)
        slot[order] = torch.arange(g.numel(), device=g.device) - starts[g[order]]
        object.__setattr__(self, "_slot_in_group", slot)
        object.__setattr__(self, "_group_shape", (counts.numel(), int(counts.max())))
        # rows already in [G, W] order (HF's layout, while no expert was added or removed):
        # the padded layout is then a view of the scores, no scatter needed
        span = int(counts.max()) * counts.numel()
        rows = torch.arange(g.numel(), device=g.device)
        object.__setattr__(self, "_dense", span == g.numel() and torch.equal(
            g * int(counts.max()) + slot, rows))

    @classmethod
    def dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, n_group: int = 1) -> Gate:
        """Rows are experts 0..E-1, split into n_group equal, contiguous groups (HF layout)."""
        n = weight.shape[0]
        ids = torch.arange(n, device=weight.device)
        return cls(weight, ids, ids // (n // n_group), bias)

    def to(self, device: torch.device | str) -> Gate:
        bias = None if self.bias is None else self.bias.to(device)
        return Gate(self.weight.to(device), self.expert_ids.to(device), self.group_ids.to(device), bias)


def scores(x: torch.Tensor, gate: Gate, cfg: MoEConfig) -> torch.Tensor:
    """Router scores in fp32. x: [T, H] -> [T, E]"""
    logits = x.float() @ gate.weight.float().T  # [T, E]
    if cfg.scoring_func == "softmax":
        return logits.softmax(dim=-1)
    return logits.sigmoid()


def route(x: torch.Tensor, gate: Gate, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H] -> (topk_w [T, K] fp32, already scaled; topk_ids [T, K] int64 logical ids)"""
    s = scores(x, gate, cfg)  # [T, E]
    choice = s if gate.bias is None else s + gate.bias.float()  # the bias steers selection only
    if cfg.group_limited:
        choice = _mask_groups(choice, gate, cfg)
    pos = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [T, K] row positions
    w = s.gather(1, pos)  # [T, K] weights from the unbiased scores
    if cfg.norm_topk_prob:  # as transformers does, also for K == 1
        w = w / (w.sum(dim=-1, keepdim=True) + _EPS)
    return w * cfg.routed_scaling_factor, gate.expert_ids[pos]


def _mask_groups(choice: torch.Tensor, gate: Gate, cfg: MoEConfig) -> torch.Tensor:
    """Keep the topk_group best groups of each token; every other expert gets -inf, so a
    masked group is never picked, whatever the sign of the (biased) scores."""
    if gate._dense:
        grouped = choice.reshape(choice.shape[0], *gate._group_shape)  # [T, G, W]
    else:
        grouped = choice.new_full((choice.shape[0], *gate._group_shape), float("-inf"))  # [T, G, W]
        grouped[:, gate.group_ids, gate._slot_in_group] = choice
    if cfg.topk_method == "noaux_tc":
        top = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values  # [T, G, 2]
        group_score = top.nan_to_num(neginf=0.0).sum(-1)  # a group of one counts its one
    else:
        group_score = grouped.amax(dim=-1)  # [T, G]
    present = torch.isfinite(grouped).any(-1)  # [T, G]; empty groups never win
    group_score = group_score.masked_fill(~present, float("-inf"))
    # groups past the last non-empty one are not in the layout (experts were removed):
    # they could never win anyway
    keep = group_score.topk(min(cfg.topk_group, group_score.shape[1]), dim=-1).indices  # [T, <=topk_group]
    kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)  # [T, G]
    return choice.masked_fill(~kept[:, gate.group_ids], float("-inf"))  # [T, E]

