"""Dispatch and combine: route (token, k) pairs to expert replicas and add the results back.

    plan     sort the T·K pairs by expert, split each expert's rows over its replicas
             (least-loaded host first), group them per host and per slot (the host's
             kernel layout)
    combine  out[T, H] = Σ_k topk_w · y, with index_add_, in fp32, scaling y in place

Pure tensor functions over a `LayerTable` (one layer of the routing table). No Ray, no grpc,
no knowledge of how experts compute; no Python loop over tokens.

`plan` runs on numpy: its arrays are small integer index arrays, where each torch op costs
several µs of dispatch and numpy's cost about one (a decode-sized plan is a dozen ops).
`plan_reference` is the same algorithm in torch, kept as its slow twin for the parity tests.

# T = tokens, K = experts per token, N = T·K pairs, H = hidden, R = replicas of the layer,
# X = max expert id + 1, S = hosts
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LayerTable", "HostBatch", "Plan", "plan", "plan_reference", "combine"]


@dataclass(frozen=True)
class LayerTable:
    """One layer of the routing table, as tensors indexed by logical expert id.

    rep_start, rep_count: [X], the replicas of expert e are rows
    rep_start[e] : rep_start[e] + rep_count[e] of rep_host, rep_slot: [R].
    replicas: the expert id -> [(host index, slot), ...] mapping the tensors were built from.
    """

    rep_start: torch.Tensor
    rep_count: torch.Tensor
    rep_host: torch.Tensor
    rep_slot: torch.Tensor
    replicas: dict[int, list[tuple[int, int]]]

    def __post_init__(self):
        # numpy views of the tensors (no copy) and what every plan derives from them: the
        # expert of each replica row [R], and the span of slot numbers for the (host, slot) key
        start, count, host, slot = (t.cpu().numpy() for t in (self.rep_start, self.rep_count,
                                                              self.rep_host, self.rep_slot))
        expert = np.repeat(np.arange(count.size), count)  # [R]
        span = int(slot.max()) + 1 if slot.size else 1
        object.__setattr__(self, "_np", _TableArrays(start, count, host, slot, expert, span))

    @classmethod
    def from_replicas(cls, replicas: dict[int, list[tuple[int, int]]]) -> LayerTable:
        """replicas: expert id -> [(host index, slot), ...]; an expert listed with no replica
        is planned like an unlisted one (LookupError)."""
        ids = sorted(replicas)
        count = torch.zeros(ids[-1] + 1 if ids else 0, dtype=torch.long)  # [X]
        flat: list[tuple[int, int]] = []
        for e in ids:
            count[e] = len(replicas[e])
            flat.extend(replicas[e])
        pairs = torch.tensor(flat, dtype=torch.long).reshape(-1, 2)  # [R, 2]
        return cls(torch.cumsum(count, 0) - count, count, pairs[:, 0].clone(),
                   pairs[:, 1].clone(), {e: list(replicas[e]) for e in ids})

    def without_hosts(self, hosts: set[int]) -> LayerTable:
        """This table minus every replica on `hosts`; experts left with none stay listed
        with no replica."""
        return LayerTable.from_replicas(
            {e: [r for r in reps if r[0] not in hosts] for e, reps in self.replicas.items()}
        )


@dataclass(frozen=True)
class _TableArrays:
    """A LayerTable's tensors as numpy arrays, for `plan`."""

    start: np.ndarray  # [X]
    count: np.ndarray  # [X]
    host: np.ndarray  # [R]
    slot: np.ndarray  # [R]
    expert: np.ndarray  # [R] the expert of each replica row
    slot_span: int  # max slot + 1


@dataclass(frozen=True)
class HostBatch:
    """Rows start:end of the plan go to host `host`: slot_ids[i] gets counts[i] rows."""

    host: int
    start: int
    end: int
    slot_ids: torch.Tensor
    counts: torch.Tensor


@dataclass(frozen=True)
class Plan:
    order: torch.Tensor  # [N] flat pair index (token·K + k) of each dispatched row
    batches: list[HostBatch]
    deferred: int = 0  # the last `deferred` rows of `order` have no replica and are in no batch

    def tokens(self, k: int) -> torch.Tensor:
        """[N] the token each dispatched row belongs to."""
        return torch.div(self.order, k, rounding_mode="floor")


def plan(topk_ids: torch.Tensor, table: LayerTable, in_flight_rows: torch.Tensor | None = None,
         defer_missing: bool = False) -> Plan:
    """`plan_reference` on numpy: the same plan, element for element, at a fraction of the
    cost for decode-sized requests."""
    ids = np.asarray(topk_ids.reshape(-1).cpu().numpy(), dtype=np.int64)  # [N]
    a: _TableArrays = table._np
    by_expert = np.argsort(ids, kind="stable")  # [N]
    e = ids[by_expert]  # [N] sorted expert ids
    known = e < a.count.size  # [N]; ids past the table have no replica either
    cnt = np.zeros_like(e)  # [N] replicas of each row's expert
    cnt[known] = a.count[e[known]]
    missing = cnt == 0  # [N]
    load = None if in_flight_rows is None else in_flight_rows.cpu().numpy()
    if not missing.any():
        order, batches = _assign_np(by_expert, e, cnt, a, load)
        return Plan(torch.from_numpy(order), batches)
    if not defer_missing:
        raise LookupError(f"no replica for expert(s) {sorted(set(e[missing].tolist()))}")
    keep = ~missing
    order, batches = _assign_np(by_expert[keep], e[keep], cnt[keep], a, load)
    return Plan(torch.from_numpy(np.concatenate([order, by_expert[missing]])), batches,
                int(missing.sum()))


def _assign_np(by_expert: np.ndarray, e: np.ndarray, cnt: np.ndarray, a: _TableArrays,
               in_flight_rows: np.ndarray | None) -> tuple[np.ndarray, list[HostBatch]]:
    """`_assign` on numpy arrays."""
    if e.size == 0:
        return by_expert, []
    n_e = np.bincount(e, minlength=a.count.size)  # [X]
    rank = np.arange(e.size) - (np.cumsum(n_e) - n_e)[e]  # [M] rank within expert
    if in_flight_rows is None:
        rep = a.start[e] + rank % cnt  # [M] replica row
    else:
        by_load = np.argsort(in_flight_rows[a.host], kind="stable")  # [R]
        by_load = by_load[np.argsort(a.expert[by_load], kind="stable")]  # [R] by (expert, load)
        rep = by_load[a.start[e] + rank % cnt]  # [M] replica row
    host, slot = a.host[rep], a.slot[rep]  # [M]
    by_slot = np.argsort(host * a.slot_span + slot, kind="stable")  # [M]
    host, slot = host[by_slot], slot[by_slot]
    cuts = [0, *(np.flatnonzero(host[1:] != host[:-1]) + 1).tolist(), host.size]
    batches = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):  # one entry per host, never per token
        s = slot[lo:hi]
        first = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))  # [M'] run starts
        counts = np.diff(np.append(first, hi - lo))
        batches.append(HostBatch(int(host[lo]), lo, hi, torch.from_numpy(s[first]),
                                 torch.from_numpy(counts.astype(np.int64))))
    return by_expert[by_slot], batches


def plan_reference(topk_ids: torch.Tensor, table: LayerTable,
                   in_flight_rows: torch.Tensor | None = None, defer_missing: bool = False) -> Plan:
    """topk_ids: [T, K] logical expert ids; in_flight_rows: [S] rows in flight per host index
    (None: all equal) -> the dispatch plan.

    Each expert's replicas are ranked by their host's load (ascending; ties keep table order)
    and its rows dealt out over them in that order, so every replica gets ⌊n/c⌋ or ⌈n/c⌉ rows
    and the extra ones go to the least loaded (a single row: to the least-loaded replica).
    Rows are then sorted by (host, slot), so each host gets one contiguous block already
    grouped by slot. Rows of experts with no replica raise LookupError naming the experts, or,
    with `defer_missing`, go last in `order`, in no batch (`Plan.deferred` counts them).
    """
    ids = topk_ids.reshape(-1).cpu()  # [N]
    by_expert = torch.argsort(ids, stable=True)  # [N]
    e = ids[by_expert]  # [N] sorted expert ids
    known = e < table.rep_count.numel()  # [N]; ids past the table have no replica either
    cnt = torch.zeros_like(e)  # [N] replicas of each row's expert
    cnt[known] = table.rep_count[e[known]]
    missing = cnt == 0  # [N]
    if not bool(missing.any()):
        return Plan(*_assign(by_expert, e, cnt, table, in_flight_rows))
    if not defer_missing:
        raise LookupError(f"no replica for expert(s) {sorted(set(e[missing].tolist()))}")
    keep = ~missing
    order, batches = _assign(by_expert[keep], e[keep], cnt[keep], table, in_flight_rows)
    return Plan(torch.cat([order, by_expert[missing]]), batches, int(missing.sum()))


def _assign(by_expert: torch.Tensor, e: torch.Tensor, cnt: torch.Tensor, table: LayerTable,
            in_flight_rows: torch.Tensor | None) -> tuple[torch.Tensor, list[HostBatch]]:
    """by_expert: [M] pair indices sorted by expert, e: [M] their expert ids, cnt: [M] > 0
    their experts' replica counts -> (order [M] sorted by (host, slot), batches)."""
    if e.numel() == 0:
        return by_expert, []
    n_e = torch.bincount(e, minlength=table.rep_count.numel())  # [X]
    rank = torch.arange(e.numel()) - (torch.cumsum(n_e, 0) - n_e)[e]  # [M] rank within expert
    rep = _by_load(table, in_flight_rows)[table.rep_start[e] + rank % cnt]  # [M] replica row
    host, slot = table.rep_host[rep], table.rep_slot[rep]  # [M]
    key = host * (int(table.rep_slot.max()) + 1) + slot  # [M]
    by_slot = torch.argsort(key, stable=True)  # [M]
    return by_expert[by_slot], _host_batches(host[by_slot], slot[by_slot])


def _by_load(table: LayerTable, in_flight_rows: torch.Tensor | None) -> torch.Tensor:
    """[R] replica rows reordered so each expert's block lists its replicas least-loaded
    host first (stable); the blocks keep their places (rep_start still holds)."""
    r = table.rep_host.numel()
    if in_flight_rows is None:
        return torch.arange(r)
    load = in_flight_rows.cpu()[table.rep_host]  # [R]
    expert = torch.repeat_interleave(torch.arange(table.rep_count.numel()), table.rep_count)  # [R]
    by_load = torch.argsort(load, stable=True)  # [R]
    return by_load[torch.argsort(expert[by_load], stable=True)]  # [R] sorted by (expert, load)


def _host_batches(host: torch.Tensor, slot: torch.Tensor) -> list[HostBatch]:
    """host, slot: [N] sorted by (host, slot) -> one HostBatch per host present."""
    hosts, host_rows = torch.unique_consecutive(host, return_counts=True)
    bounds = [0, *torch.cumsum(host_rows, 0).tolist()]
    batches = []
    for i, h in enumerate(hosts.tolist()):  # one entry per host, never per token
        lo, hi = bounds[i], bounds[i + 1]
        slots, counts = torch.unique_consecutive(slot[lo:hi], return_counts=True)
        batches.append(HostBatch(h, lo, hi, slots, counts))
    return batches


def combine(
    y: torch.Tensor, p: Plan, topk_w: torch.Tensor, num_tokens: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y: [N, H] expert outputs in plan order; topk_w: [T, K] -> out [T, H] fp32
    (added into `out` when given, e.g. already holding the shared experts' output).
    An fp32 y is scaled in place (it is the caller's scratch buffer): no [N, H] temporary."""
    k = topk_w.shape[1]
    if out is None:
        out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
    w = topk_w.reshape(-1)[p.order.to(topk_w.device)].to(y.device)  # [N]
    out.index_add_(0, p.tokens(k).to(y.device), y.float().mul_(w[:, None]))
    return out
