"""router/dispatch.py: every (token, k) pair reaches a replica of its expert and comes back
to its token with its weight.

Hosts are simulated from the table alone: a host applies, to each slot's rows, the expert
that the table says lives in that slot. If the plan sent a row to the wrong slot, or mixed up
the order, the combined output would differ from the per-pair loop written here.

# T = tokens, K = experts per token, N = T·K pairs, H = hidden
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from moefleet.router.dispatch import LayerTable, Plan, combine, plan, plan_reference

pytestmark = pytest.mark.unit

H = 8

# expert id -> replicas (host, slot). Expert 0 has three replicas, 2 and 5 have two; slot
# numbers are not contiguous on host 2.
REPLICAS = {
    0: [(0, 0), (1, 0), (2, 0)],
    1: [(0, 1)],
    2: [(1, 1), (2, 3)],
    3: [(2, 1)],
    4: [(0, 2)],
    5: [(1, 2), (0, 3)],
}


def _expert_maps(n: int, seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {e: torch.randn(H, H, generator=g) for e in range(n)}  # expert e: x -> x @ M_e


def _run_hosts(x: torch.Tensor, p: Plan, k: int, replicas: dict, maps: dict) -> torch.Tensor:
    """What the hosts return, in plan order: each slot's rows go through its own expert."""
    where = {rep: e for e, reps in replicas.items() for rep in reps}  # (host, slot) -> expert
    rows = x[p.tokens(k)]  # [N, H]
    ys = []
    for b in p.batches:
        lo = b.start
        for slot, n in zip(b.slot_ids.tolist(), b.counts.tolist(), strict=True):
            ys.append(rows[lo:lo + n] @ maps[where[(b.host, slot)]])
            lo += n
    return torch.cat(ys) if ys else x.new_zeros(0, H)


def _combine_loop(x: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor,
                  maps: dict) -> torch.Tensor:
    """out[t] = Σ_k w[t, k] · expert_{ids[t, k]}(x[t]), one pair at a time."""
    out = torch.zeros(x.shape[0], H)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            out[t] += topk_w[t, k] * (x[t] @ maps[int(topk_ids[t, k])])
    return out


def _random_routes(t: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(t, n, generator=g).argsort(-1)[:, :k]  # [T, K], distinct per token
    return torch.rand(t, k, generator=g) + 0.1, ids


# ---- round trips ---------------------------------------------------------------------------


# host index -> rows outstanding; None plans as if all hosts were equally loaded
LOADS = {"no-load": None, "host-1-idle": torch.tensor([5, 0, 3]), "host-0-idle": torch.tensor([0, 7, 7])}


@pytest.mark.parametrize("load", list(LOADS))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_every_permutation_of_experts_round_trips_through_dispatch_and_combine(
    k: int, load: str
) -> None:
    # One token per ordered choice of k experts out of 0..4 (5·4·3·2 = 120 tokens for k = 4).
    ids = torch.tensor(list(itertools.permutations(range(5), k)))  # [T, K]
    g = torch.Generator().manual_seed(k)
    x = torch.randn(ids.shape[0], H, generator=g)
    w = torch.rand(ids.shape, generator=g) + 0.1
    maps = _expert_maps(6, seed=1)
    p = plan(ids, LayerTable.from_replicas(REPLICAS), LOADS[load])
    y = _run_hosts(x, p, k, REPLICAS, maps)
    torch.testing.assert_close(combine(y, p, w, x.shape[0]), _combine_loop(x, w, ids, maps))


@pytest.mark.parametrize("t", [1, 7, 64])
def test_identity_experts_combine_to_the_weighted_sum_of_the_input(t: int) -> None:
    w, ids = _random_routes(t, 3, 6, seed=t)
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(100 + t))
    p = plan(ids, LayerTable.from_replicas(REPLICAS))
    y = x[p.tokens(3)]  # each "expert" returns its row unchanged
    torch.testing.assert_close(combine(y, p, w, t), w.sum(-1, keepdim=True) * x)


def test_host_load_changes_where_rows_go_but_not_the_combined_output() -> None:
    w, ids = _random_routes(33, 3, 6, seed=11)
    x = torch.randn(33, H, generator=torch.Generator().manual_seed(12))
    maps = _expert_maps(6, seed=13)
    table = LayerTable.from_replicas(REPLICAS)
    p0, p1 = plan(ids, table), plan(ids, table, torch.tensor([9, 0, 4]))
    assert not torch.equal(p0.order, p1.order), "the load sends some rows elsewhere"
    torch.testing.assert_close(combine(_run_hosts(x, p1, 3, REPLICAS, maps), p1, w, 33),
                               combine(_run_hosts(x, p0, 3, REPLICAS, maps), p0, w, 33))


def test_plan_order_is_a_permutation_of_all_pairs() -> None:
    _, ids = _random_routes(50, 4, 6, seed=3)
    p = plan(ids, LayerTable.from_replicas(REPLICAS))
    torch.testing.assert_close(p.order.sort().values, torch.arange(200))
    torch.testing.assert_close(p.tokens(4), p.order // 4)


def test_combine_adds_into_a_given_output() -> None:
    w, ids = _random_routes(9, 2, 6, seed=4)
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(5))
    base = torch.randn(9, H, generator=torch.Generator().manual_seed(6))  # e.g. shared experts
    p = plan(ids, LayerTable.from_replicas(REPLICAS))
    out = combine(x[p.tokens(2)], p, w, 9, out=base.clone())
    torch.testing.assert_close(out, base + w.sum(-1, keepdim=True) * x)


def test_noncontiguous_expert_ids_are_dispatched_to_their_own_replicas() -> None:
    replicas = {3: [(0, 0)], 17: [(1, 0), (0, 4)], 40: [(1, 2)]}
    maps = {e: torch.randn(H, H, generator=torch.Generator().manual_seed(e)) for e in replicas}
    ids = torch.tensor([[3, 17], [40, 3], [17, 40], [17, 3]])
    w = torch.rand(4, 2, generator=torch.Generator().manual_seed(7)) + 0.1
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(8))
    p = plan(ids, LayerTable.from_replicas(replicas))
    y = _run_hosts(x, p, 2, replicas, maps)
    torch.testing.assert_close(combine(y, p, w, 4), _combine_loop(x, w, ids, maps))


# ---- plan layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("load", list(LOADS))
def test_each_host_gets_one_contiguous_block_sorted_by_slot(load: str) -> None:
    _, ids = _random_routes(64, 4, 6, seed=9)
    p = plan(ids, LayerTable.from_replicas(REPLICAS), LOADS[load])
    hosts = [b.host for b in p.batches]
    assert sorted(hosts) == sorted(set(hosts)) == [0, 1, 2]
    assert p.batches[0].start == 0 and p.batches[-1].end == 256
    for prev, nxt in itertools.pairwise(p.batches):
        assert prev.end == nxt.start
    where = {rep: e for e, reps in REPLICAS.items() for rep in reps}
    flat_ids = ids.reshape(-1)[p.order]  # [N] the expert of each dispatched row
    for b in p.batches:
        slots = b.slot_ids.tolist()
        assert slots == sorted(set(slots)), "slots strictly increasing within a host"
        assert int(b.counts.sum()) == b.end - b.start and bool((b.counts > 0).all())
        bounds = [b.start, *(b.start + b.counts.cumsum(0)).tolist()]
        for slot, lo, hi in zip(slots, bounds[:-1], bounds[1:], strict=True):
            assert set(flat_ids[lo:hi].tolist()) == {where[(b.host, slot)]}


def test_rows_of_a_replicated_expert_are_split_evenly_over_its_replicas() -> None:
    # 10 tokens all pick expert 0 (three replicas) and expert 2 (two replicas).
    ids = torch.tensor([[0, 2]] * 10 + [[1, 5]] * 3)
    p = plan(ids, LayerTable.from_replicas(REPLICAS))
    rows = {(b.host, s): c for b in p.batches
            for s, c in zip(b.slot_ids.tolist(), b.counts.tolist(), strict=True)}
    assert sorted(rows[r] for r in REPLICAS[0]) == [3, 3, 4]
    assert [rows[r] for r in REPLICAS[2]] == [5, 5]
    assert sorted(rows[r] for r in REPLICAS[5]) == [1, 2]
    assert rows[(0, 1)] == 3  # expert 1, one replica, gets all its rows


def _rows_per_replica(p: Plan) -> dict[tuple[int, int], int]:
    return {(b.host, s): c for b in p.batches
            for s, c in zip(b.slot_ids.tolist(), b.counts.tolist(), strict=True)}


@pytest.mark.parametrize(("load", "host"), [
    ([5, 1, 3], 1), ([0, 9, 1], 0), ([4, 4, 2], 2), ([3, 3, 3], 0),
], ids=["host-1", "host-0", "host-2", "tie-keeps-table-order"])
def test_a_single_row_goes_to_the_replica_on_the_least_loaded_host(
    load: list[int], host: int
) -> None:
    p = plan(torch.tensor([[0]]), LayerTable.from_replicas(REPLICAS), torch.tensor(load))
    assert [(b.host, b.slot_ids.tolist(), b.counts.tolist()) for b in p.batches] == [(host, [0], [1])]


@pytest.mark.parametrize(("t", "load", "rows_by_host"), [
    (10, [5, 1, 3], {1: 4, 2: 3, 0: 3}),
    (11, [5, 1, 3], {1: 4, 2: 4, 0: 3}),
    (2, [5, 1, 3], {1: 1, 2: 1}),
    (9, [5, 1, 3], {1: 3, 2: 3, 0: 3}),
])
def test_rows_split_evenly_with_the_extra_rows_on_the_least_loaded_hosts(
    t: int, load: list[int], rows_by_host: dict[int, int]
) -> None:
    # t tokens all pick expert 0, whose replicas are slot 0 on hosts 0, 1 and 2
    p = plan(torch.zeros(t, 1, dtype=torch.long), LayerTable.from_replicas(REPLICAS),
             torch.tensor(load))
    assert {h: c for (h, _), c in _rows_per_replica(p).items()} == rows_by_host
    assert len({b.host for b in p.batches}) == len(p.batches), "one batch per host"


def test_host_load_reorders_the_replicas_of_each_expert_separately() -> None:
    # expert 2 lives on hosts 1 and 2, expert 5 on hosts 1 and 0: with host 1 the busiest,
    # a single row of each goes to host 2 and host 0, both in one batch per host
    p = plan(torch.tensor([[2, 5]]), LayerTable.from_replicas(REPLICAS), torch.tensor([1, 9, 0]))
    assert _rows_per_replica(p) == {(2, 3): 1, (0, 3): 1}
    assert [b.host for b in p.batches] == [0, 2]


def test_only_hosts_with_rows_get_a_batch() -> None:
    p = plan(torch.tensor([[3], [3], [3]]), LayerTable.from_replicas(REPLICAS))
    assert [(b.host, b.slot_ids.tolist(), b.counts.tolist()) for b in p.batches] == [(2, [1], [3])]


def test_table_from_replicas_indexes_replicas_by_expert_id() -> None:
    t = LayerTable.from_replicas({4: [(1, 7)], 1: [(0, 2), (1, 3)]})
    assert t.rep_count.tolist() == [0, 2, 0, 0, 1]
    for e, reps in {1: [(0, 2), (1, 3)], 4: [(1, 7)]}.items():
        lo, n = int(t.rep_start[e]), int(t.rep_count[e])
        assert list(zip(t.rep_host[lo:lo + n].tolist(), t.rep_slot[lo:lo + n].tolist(),
                        strict=True)) == reps


def test_without_hosts_removes_every_replica_on_those_hosts() -> None:
    t = LayerTable.from_replicas(REPLICAS).without_hosts({1})
    assert t.replicas == {e: [r for r in reps if r[0] != 1] for e, reps in REPLICAS.items()}
    assert t.rep_count.tolist() == [2, 1, 1, 1, 1, 1]
    p = plan(torch.tensor([[0, 2], [5, 3]] * 4), t)
    assert 1 not in {b.host for b in p.batches}
    assert LayerTable.from_replicas(REPLICAS).replicas == REPLICAS, "the source is unchanged"


def test_without_hosts_leaves_an_expert_with_no_replica_unplannable() -> None:
    t = LayerTable.from_replicas(REPLICAS).without_hosts({2, 1})  # expert 3 was only on host 2
    assert t.replicas[3] == [] and t.replicas[2] == []  # expert 2 was on hosts 1 and 2
    with pytest.raises(LookupError, match=r"no replica for expert\(s\) \[2, 3\]"):
        plan(torch.tensor([[0, 3], [2, 1]]), t)
    p = plan(torch.tensor([[0, 1], [4, 5]]), t)  # still plans a request that avoids them
    assert [b.host for b in p.batches] == [0]


def test_a_table_without_any_host_still_plans_an_empty_batch() -> None:
    t = LayerTable.from_replicas(REPLICAS).without_hosts({0, 1, 2})
    assert plan(torch.zeros(0, 2, dtype=torch.long), t).batches == []
    with pytest.raises(LookupError, match=r"no replica for expert\(s\) \[4\]"):
        plan(torch.tensor([[4]]), t)


# ---- edges ---------------------------------------------------------------------------------


def test_empty_batch_plans_nothing_and_combines_to_empty() -> None:
    ids = torch.zeros(0, 2, dtype=torch.long)
    p = plan(ids, LayerTable.from_replicas(REPLICAS))
    assert p.order.numel() == 0 and p.batches == []
    out = combine(torch.zeros(0, H), p, torch.zeros(0, 2), 0)
    assert out.shape == (0, H) and out.dtype == torch.float32


def test_expert_without_replica_raises_lookup_error_naming_it() -> None:
    table = LayerTable.from_replicas({0: [(0, 0)], 1: [(0, 1)], 3: [(1, 0)]})
    with pytest.raises(LookupError, match=r"no replica for expert\(s\) \[2\]"):
        plan(torch.tensor([[0, 1], [2, 3]]), table)
    # the same table still plans a request that avoids expert 2
    p = plan(torch.tensor([[0, 3]]), table)
    assert [b.host for b in p.batches] == [0, 1]


def test_expert_id_beyond_the_table_raises_lookup_error_naming_it() -> None:
    table = LayerTable.from_replicas({0: [(0, 0)], 1: [(0, 1)]})
    with pytest.raises(LookupError, match=r"no replica for expert\(s\) \[5\]"):
        plan(torch.tensor([[0, 5]]), table)


def test_deferred_rows_of_experts_without_a_replica_go_last_in_no_batch() -> None:
    t = LayerTable.from_replicas(REPLICAS).without_hosts({2, 1})  # experts 2 and 3 have none
    ids = torch.tensor([[0, 2], [3, 5], [2, 1], [9, 0]])  # 9: past the table
    p = plan(ids, t, defer_missing=True)
    flat = ids.reshape(-1)
    assert p.deferred == 4
    assert sorted(flat[p.order[-4:]].tolist()) == [2, 2, 3, 9]
    assert sorted(p.order.tolist()) == list(range(8)), "every pair exactly once"
    batched = sum(b.end - b.start for b in p.batches)
    assert batched == 4 and max(b.end for b in p.batches) == 4
    assert sorted(flat[p.order[:4]].tolist()) == [0, 0, 1, 5]


# ---- the numpy plan against its torch twin ---------------------------------------------------


def _random_table(g: torch.Generator, experts: int, hosts: int) -> dict[int, list[tuple[int, int]]]:
    """Random replicas: some experts absent or with none, slots unique per host, not contiguous."""
    free = {h: torch.randperm(3 * experts, generator=g).tolist() for h in range(hosts)}
    replicas = {}
    for e in range(experts):
        if torch.rand(1, generator=g) < 0.15:
            continue  # not in the table at all
        n = int(torch.randint(0, 4, (1,), generator=g))  # 0: listed with no replica
        on = torch.randperm(hosts, generator=g)[:n].tolist()
        replicas[e] = [(h, free[h].pop()) for h in on]
    return replicas


@pytest.mark.parametrize("seed", range(40))
def test_numpy_plan_equals_the_torch_reference_element_for_element(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    experts, hosts = int(torch.randint(1, 20, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    table = LayerTable.from_replicas(_random_table(g, experts, hosts))
    t, k = int(torch.randint(0, 70, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    ids = torch.randint(0, experts + 2, (t, k), generator=g)  # some past the table
    for load in (None, torch.randint(0, 4, (hosts,), generator=g)):
        want = plan_reference(ids, table, load, defer_missing=True)
        got = plan(ids, table, load, defer_missing=True)
        assert torch.equal(got.order, want.order) and got.deferred == want.deferred
        assert got.order.dtype == want.order.dtype == torch.long
        assert len(got.batches) == len(want.batches)
        for a, b in zip(got.batches, want.batches, strict=True):
            assert (a.host, a.start, a.end) == (b.host, b.start, b.end)
            assert torch.equal(a.slot_ids, b.slot_ids) and torch.equal(a.counts, b.counts)
            assert a.slot_ids.dtype == b.slot_ids.dtype and a.counts.dtype == b.counts.dtype
        if want.deferred:
            with pytest.raises(LookupError) as theirs:
                plan_reference(ids, table, load)
            with pytest.raises(LookupError, match=re.escape(str(theirs.value))):
                plan(ids, table, load)
