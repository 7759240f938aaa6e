"""cluster/registry.py: a layer's gate built from per-expert rows routes like the HF dense gate
while ids are contiguous and like a per-token reference once experts are gone; lookups,
slots and the journal snapshot say what the registry holds; a removal that would leave a
layer unable to route is refused with FAILED_PRECONDITION.

# T = tokens, H = hidden, E = experts of a layer, K = experts per token
"""

from __future__ import annotations

import pytest
import torch

from moefleet.cluster.registry import (
    MAX_EXPERT_ID,
    ExpertRecord,
    HostRecord,
    ModelRecord,
    check_new_expert_id,
    check_rebalance_total,
    check_removable,
    check_replica_counts,
    parse_new_expert,
    rebalance_knob,
)
from moefleet.cluster.spec import ModelSpec
from moefleet.core.config import MoEConfig
from moefleet.core.errors import FailedPrecondition, InvalidArgument, NotFound
from moefleet.router.gating import Gate, route
from moefleet.testing import expert_file, random_expert
from tests.specs import FAMILIES, family_spec

pytestmark = pytest.mark.unit

T = 32


def _rows(spec: ModelSpec, seed: int) -> dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Random HF-layout gate rows per layer: (weight [E, H], bias [E] or None, groups [E])."""
    cfg, g = spec.moe, torch.Generator().manual_seed(seed)
    n = cfg.n_routed_experts
    out = {}
    for L in spec.layers:
        weight = torch.randn(n, cfg.hidden_size, generator=g)  # [E, H]
        bias = torch.randn(n, generator=g) * 0.1 if cfg.topk_method == "noaux_tc" else None  # [E]
        out[L] = (weight, bias, torch.arange(n) // (n // cfg.n_group))
    return out


def _model(spec: ModelSpec, seed: int = 0) -> tuple[ModelRecord, dict]:
    rows = _rows(spec, seed)
    experts = {L: {e: ExpertRecord(w[e], None if b is None else b[e].item(), int(grp[e]))
                   for e in range(w.shape[0])} for L, (w, b, grp) in rows.items()}
    return ModelRecord(spec, experts, {L: None for L in spec.layers}, spec.autoscaling), rows


def _x(spec: ModelSpec, seed: int) -> torch.Tensor:
    return torch.randn(T, spec.moe.hidden_size, generator=torch.Generator().manual_seed(seed))  # [T, H]


def _route_by_hand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   ids: list[int], groups: list[int], cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow twin of `route`, one token at a time over the rows given.
    x: [T, H], weight: [E, H], bias: [E] -> (topk_w [T, K], topk_ids [T, K])"""
    all_w, all_ids = [], []
    for t in range(x.shape[0]):
        logits = weight @ x[t]  # [E]
        s = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        choice = s if bias is None else s + bias
        allowed = range(len(ids))
        if cfg.group_limited:
            members: dict[int, list[int]] = {}
            for i, grp in enumerate(groups):
                members.setdefault(grp, []).append(i)
            score = {}  # V2: the group's best; V3: the sum of its best two (or its one)
            for grp, rows in members.items():
                best = sorted((choice[i].item() for i in rows), reverse=True)
                score[grp] = sum(best[:2]) if cfg.topk_method == "noaux_tc" else best[0]
            kept = sorted(members, key=score.__getitem__, reverse=True)
            allowed = [i for grp in kept[:cfg.topk_group] for i in members[grp]]
        top = sorted(allowed, key=lambda i: choice[i].item(), reverse=True)[:cfg.num_experts_per_tok]
        w = s[top]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        all_w.append(w * cfg.routed_scaling_factor)
        all_ids.append([ids[i] for i in top])
    return torch.stack(all_w), torch.tensor(all_ids)


def _assert_same_routes(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]):
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


# Removals each family's check accepts, leaving non-contiguous ids (and, for the two DeepSeek
# families, uneven groups: v2 keeps [3, 1, 4, 3] experts per group, v3 [0, 4, 3, 3]).
REMOVALS = {
    "mixtral": [0, 3, 6],
    "olmoe": [1, 2, 9, 15],
    "qwen2_moe": [0, 5, 11],
    "deepseek_v2": [1, 4, 5, 6, 13],
    "deepseek_v3": [0, 1, 2, 3, 9, 14],
}


# ---- the gate ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gate_of_contiguous_experts_routes_like_the_dense_gate_of_the_same_rows(family: str) -> None:
    spec = family_spec(family)
    model, rows = _model(spec, seed=1)
    x = _x(spec, seed=2)
    for L in spec.layers:
        weight, bias, _ = rows[L]
        dense = Gate.dense(weight, bias, spec.moe.n_group)
        gate = model.gate(L)
        torch.testing.assert_close(gate.expert_ids, dense.expert_ids)
        torch.testing.assert_close(gate.group_ids, dense.group_ids)
        _assert_same_routes(route(x, gate, spec.moe), route(x, dense, spec.moe))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gate_after_removals_routes_like_a_reference_over_the_remaining_rows(family: str) -> None:
    spec, L = family_spec(family), 3
    model, rows = _model(spec, seed=3)
    weight, bias, groups = rows[L]
    for e in REMOVALS[family]:
        check_removable(model, L, e)
        del model.experts[L][e]
    keep = [e for e in range(spec.moe.n_routed_experts) if e not in REMOVALS[family]]
    keep_bias = None if bias is None else bias[keep]
    x = _x(spec, seed=4)

    got = route(x, model.gate(L), spec.moe)

    direct = Gate(weight[keep], torch.tensor(keep), groups[keep], keep_bias)
    _assert_same_routes(got, route(x, direct, spec.moe))
    by_hand = _route_by_hand(x, weight[keep], keep_bias, keep, groups[keep].tolist(), spec.moe)
    _assert_same_routes(got, by_hand)
    assert not set(got[1].flatten().tolist()) & set(REMOVALS[family])
    # the other layer is untouched: still the dense gate of its rows
    w1, b1, _ = rows[1]
    _assert_same_routes(route(x, model.gate(1), spec.moe),
                        route(x, Gate.dense(w1, b1, spec.moe.n_group), spec.moe))


def test_gate_carries_each_experts_selection_bias_in_id_order() -> None:
    spec, L = family_spec("deepseek_v3"), 1
    model, rows = _model(spec, seed=5)
    del model.experts[L][2]
    gate = model.gate(L)
    keep = [e for e in range(16) if e != 2]
    assert gate.bias is not None and gate.bias.dtype == torch.float32
    torch.testing.assert_close(gate.bias, rows[L][1][keep])


def test_gate_has_no_bias_when_no_expert_has_one_and_zero_for_an_expert_without() -> None:
    spec, L = family_spec("mixtral"), 1
    model, _ = _model(spec, seed=6)
    assert model.gate(L).bias is None
    model.experts[L][4].bias = 0.25  # e.g. an added expert that came with a bias
    bias = model.gate(L).bias
    assert bias is not None
    torch.testing.assert_close(bias, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.25, 0.0, 0.0, 0.0]))


# ---- lookups and slots ---------------------------------------------------------------------


def test_placement_maps_every_expert_to_its_replica_hosts_in_order() -> None:
    spec = family_spec("mixtral")
    model, _ = _model(spec)
    model.replicas = {(1, 0): [("h1", 3), ("h0", 0)], (3, 7): [("h0", 1)], (3, 2): []}
    placement = model.placement()
    assert len(placement) == 16  # 2 layers × 8 experts, placed or not
    assert placement[(1, 0)] == ["h1", "h0"]
    assert placement[(3, 7)] == ["h0"]
    assert placement[(3, 2)] == [] and placement[(1, 5)] == []
    assert list(placement) == model.keys() == sorted(placement)


def test_next_expert_id_is_one_past_the_largest_id_left() -> None:
    model, _ = _model(family_spec("mixtral"))
    assert model.next_expert_id(1) == 8
    del model.experts[1][3]
    assert model.next_expert_id(1) == 8  # a gap is not reused
    del model.experts[1][7]
    assert model.next_expert_id(1) == 7  # only the largest id counts
    model.experts[1] = {}
    assert model.next_expert_id(1) == 0


def test_expert_of_an_unknown_layer_or_id_raises_not_found() -> None:
    model, _ = _model(family_spec("mixtral"))
    assert model.expert(3, 5) is model.experts[3][5]
    with pytest.raises(NotFound, match=r"no MoE layer 2; layers: \[1, 3\]") as layer:
        model.expert(2, 0)
    del model.experts[3][5]
    with pytest.raises(NotFound, match="layer 3 has no expert 5") as expert:
        model.expert(3, 5)
    assert layer.value.code == expert.value.code == "NOT_FOUND"
    assert model.expert(3, 6) is model.experts[3][6]  # lookups still answer afterwards


def test_host_reserve_takes_the_lowest_free_slot_and_free_slots_counts_what_is_left() -> None:
    host = HostRecord("h0", "m", None, {"slots_total": 4})
    assert host.free_slots() == 4
    assert [host.reserve((1, e)) for e in (5, 6, 7)] == [0, 1, 2]
    assert host.free_slots() == 1
    del host.slots[1]
    assert host.reserve((3, 0)) == 1  # the freed slot, not the last one
    assert host.reserve((3, 1)) == 3
    assert host.free_slots() == 0
    assert host.slots == {0: (1, 5), 1: (3, 0), 2: (1, 7), 3: (3, 1)}


# ---- the journal snapshot ------------------------------------------------------------------


def test_to_plain_lists_added_and_removed_experts_targets_and_replicas() -> None:
    spec = family_spec("mixtral")
    model, _ = _model(spec)
    del model.experts[1][2]
    del model.experts[3][0]
    del model.experts[3][5]
    model.experts[1][8] = ExpertRecord(torch.randn(64), None, 0, file="/state/m-1-8.safetensors")
    model.replicas = {(1, 0): [("h0", 0), ("h1", 3)], (1, 8): [("h1", 1)]}
    model.target = {(1, 0): 2, (1, 8): 1}
    model.version, model.next_host = 5, 2

    plain = model.to_plain()

    assert plain["added"] == [[1, 8, 0, "/state/m-1-8.safetensors"]]
    assert sorted(plain["removed"]) == [[1, 2], [3, 0], [3, 5]]
    assert sorted(plain["replicas"]) == [[1, 0, "h0", 0], [1, 0, "h1", 3], [1, 8, "h1", 1]]
    assert sorted(plain["target"]) == [[1, 0, 2], [1, 8, 1]]
    assert (plain["version"], plain["next_host"]) == (5, 2)
    assert ModelSpec.from_dict(plain["spec"]) == spec
    assert plain["autoscaling"] == vars(spec.autoscaling)
    plain["autoscaling"]["min_replicas"] = 3
    assert model.autoscaling.min_replicas == 1  # a copy, not the live config


def test_the_smoothed_rates_survive_the_journal_and_one_under_the_old_name_too() -> None:
    model = ModelRecord.from_spec(family_spec("mixtral"))
    model.tokens_per_s = {(1, 0): 12.5, (3, 7): 0.25}
    plain = model.to_plain()
    assert ModelRecord.from_plain(plain)[0].tokens_per_s == model.tokens_per_s
    plain["load"] = plain.pop("tokens_per_s")  # as journals written before the rename say it
    assert ModelRecord.from_plain(plain)[0].tokens_per_s == model.tokens_per_s
    del plain["load"]
    assert ModelRecord.from_plain(plain)[0].tokens_per_s == {}


# ---- removals ------------------------------------------------------------------------------


def test_removing_the_last_expert_of_a_layer_is_refused() -> None:
    spec = family_spec("mixtral", moe={"num_experts_per_tok": 1})
    model, _ = _model(spec)
    for e in range(7):
        check_removable(model, 1, e)
        del model.experts[1][e]
    with pytest.raises(FailedPrecondition, match="expert 7 is the last expert of layer 1") as err:
        check_removable(model, 1, 7)
    assert err.value.code == "FAILED_PRECONDITION"
    assert list(model.experts[1]) == [7]
    check_removable(model, 3, 7)  # the other layer still has all its experts


def test_removal_leaving_fewer_than_top_k_experts_is_refused() -> None:
    spec = family_spec("mixtral")  # k = 2 of 8
    model, _ = _model(spec)
    for e in (0, 1, 2, 4, 5, 6):
        check_removable(model, 1, e)
        del model.experts[1][e]
    with pytest.raises(FailedPrecondition, match="would keep 1 experts; num_experts_per_tok is 2") as err:
        check_removable(model, 1, 3)
    assert err.value.code == "FAILED_PRECONDITION"
    ids = route(_x(spec, seed=7), model.gate(1), spec.moe)[1]
    assert sorted(set(ids.flatten().tolist())) == [3, 7]  # the layer still routes to both


def test_group_limited_removal_leaving_the_smallest_kept_groups_short_of_top_k_is_refused() -> None:
    # deepseek_v2: 4 groups of 4, keep 2 groups, k = 3.
    spec = family_spec("deepseek_v2")
    model, _ = _model(spec)
    for e in (0, 1, 2, 4, 5):  # group sizes [1, 2, 4, 4]: the two smallest hold 3 = k
        check_removable(model, 1, e)
        del model.experts[1][e]
    with pytest.raises(FailedPrecondition, match="2 smallest groups with 2 experts") as err:
        check_removable(model, 1, 6)  # would leave [1, 1, 4, 4]
    assert err.value.code == "FAILED_PRECONDITION"
    check_removable(model, 1, 3)  # emptying group 0 instead leaves [0, 2, 4, 4]: fine
    check_removable(model, 1, 15)  # and [1, 2, 4, 3] is fine too


def test_emptying_a_whole_group_is_accepted_because_empty_groups_are_never_kept() -> None:
    spec = family_spec("deepseek_v3")  # 4 groups of 4, keep 2 groups, k = 4
    model, _ = _model(spec)
    for e in (4, 5, 6, 7):  # all of group 1
        check_removable(model, 1, e)
        del model.experts[1][e]
    ids = route(_x(spec, seed=8), model.gate(1), spec.moe)[1]  # [T, K]
    assert not set(ids.flatten().tolist()) & {4, 5, 6, 7}
    assert all(len(set(row)) == 4 for row in ids.tolist())


def test_removing_an_unknown_expert_raises_not_found() -> None:
    model, _ = _model(family_spec("olmoe"))
    with pytest.raises(NotFound, match="no expert 16"):
        check_removable(model, 1, 16)
    with pytest.raises(NotFound, match="no MoE layer 0"):
        check_removable(model, 0, 1)


@pytest.mark.parametrize("order", ["lowest_first", "highest_first"])
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_every_removal_check_accepts_leaves_a_layer_that_routes_to_k_present_experts(
        family: str, order: str) -> None:
    # lowest first: the highest group is never emptied. Highest first: groups 3, 2, 1 empty
    # and only group 0 (4 experts, >= k) is left, fewer groups than topk_group = 2.
    spec = family_spec(family)
    model, _ = _model(spec, seed=9)
    x, k = _x(spec, seed=10), spec.moe.num_experts_per_tok
    for e in (range(16) if order == "lowest_first" else range(15, -1, -1)):
        try:
            check_removable(model, 1, e)
        except FailedPrecondition:
            continue
        del model.experts[1][e]
        ids = route(x, model.gate(1), spec.moe)[1].tolist()  # [T, K]
        assert all(len(set(row)) == k and set(row) <= set(model.experts[1]) for row in ids)
    assert len(model.experts[1]) == k  # it got down to exactly k experts


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_an_expert_file_reads_back_as_the_row_bias_and_weights_written(family: str) -> None:
    spec = family_spec(family)
    row, bias, w = random_expert(spec, seed=31)
    rec, got = parse_new_expert(spec, expert_file(row, w, bias), group=1 if spec.moe.n_group > 1 else None)
    torch.testing.assert_close(rec.weight, row)
    assert rec.bias == (pytest.approx(bias) if bias is not None else None)
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(got, name), getattr(w, name))


def test_an_expert_file_with_a_wrong_shape_names_the_tensor() -> None:
    spec = family_spec("mixtral")
    row, _, w = random_expert(spec, seed=32)
    bad = type(w)(w.w1[:, :-1], w.w2, w.w3)
    with pytest.raises(InvalidArgument, match=r"gate_proj.weight has shape \[48, 63\]"):
        parse_new_expert(spec, expert_file(row, bad), None)


# ---- admin validation: refused before anything changes ------------------------------------------


@pytest.mark.parametrize("bias", [float("nan"), float("inf"), float("-inf")])
def test_an_expert_file_with_a_non_finite_selection_bias_is_refused(bias: float) -> None:
    spec = family_spec("deepseek_v3")
    row, _, w = random_expert(spec, seed=1)
    with pytest.raises(InvalidArgument, match="e_score_correction_bias holds a non-finite value"):
        parse_new_expert(spec, expert_file(row, w, bias), group=0)


def test_an_expert_file_with_a_tensor_moefleet_does_not_take_is_refused_naming_it() -> None:
    """A misspelt selection bias would otherwise be dropped and the expert routed with bias 0."""
    from safetensors.torch import save

    spec = family_spec("deepseek_v3")
    row, bias, w = random_expert(spec, seed=2)
    tensors = {"gate.weight": row[None], "gate_proj.weight": w.w1, "up_proj.weight": w.w3,
               "down_proj.weight": w.w2, "gate.e_score_correction_bias_": torch.tensor([bias])}
    with pytest.raises(InvalidArgument, match="does not take: 'gate.e_score_correction_bias_'"):
        parse_new_expert(spec, save(tensors), group=0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_an_expert_file_with_integer_weights_is_refused(dtype: torch.dtype) -> None:
    spec = family_spec("mixtral")
    row, _, w = random_expert(spec, seed=3)
    bad = type(w)(w.w1, (w.w2 * 100).to(dtype), w.w3)
    with pytest.raises(InvalidArgument, match=f"down_proj.weight is {str(dtype)[6:]}; .* floating point"):
        parse_new_expert(spec, expert_file(row, bad), None)


def test_weights_past_the_model_dtypes_range_are_refused_as_non_finite_once_cast() -> None:
    """1e5 is finite in float32 and inf in float16: the check runs on what would be served."""
    spec = family_spec("mixtral", dtype="float16")
    row, _, w = random_expert(spec, seed=4)
    big = type(w)(w.w1, w.w2, w.w3.clone())
    big.w3[0, 0] = 1e5
    with pytest.raises(InvalidArgument, match="up_proj.weight holds non-finite values once cast to float16"):
        parse_new_expert(spec, expert_file(row, big), None)
    rec, got = parse_new_expert(spec, expert_file(row, w), None)  # the same file in range is taken
    assert got.w3.dtype == torch.float16 and rec.weight.dtype == torch.float16


@pytest.mark.parametrize("expert", [-1, MAX_EXPERT_ID + 1, 2**40])
def test_an_added_expert_id_outside_the_documented_range_is_refused(expert: int) -> None:
    m, _ = _model(family_spec("mixtral"))
    with pytest.raises(InvalidArgument, match=f"expert ids are 0 … {MAX_EXPERT_ID}"):
        check_new_expert_id(m, 1, expert)
    check_new_expert_id(m, 1, MAX_EXPERT_ID)  # the top of the range is fine


def test_replicas_of_one_expert_past_hosts_max_count_are_refused_and_up_to_it_accepted() -> None:
    m, _ = _model(family_spec("mixtral"))  # 2 hosts, so max_count 4
    check_replica_counts(m, {(1, 0): 4})
    for n in (0, 5, 100_000):
        with pytest.raises(InvalidArgument, match=r"must be 1 … 4 \(hosts.max_count"):
            check_replica_counts(m, {(1, 0): n})


def test_replicas_in_all_past_every_possible_slot_are_refused() -> None:
    m, _ = _model(family_spec("mixtral", hosts={"slots": 6}))  # 4 hosts at most × 6 slots = 24
    m.target = {k: 1 for k in m.keys()}  # 2 layers × 8 experts
    check_replica_counts(m, {k: 2 for k in m.keys() if k[0] == 1})  # 8 × 2 + 8 = 24: fits
    with pytest.raises(FailedPrecondition, match=r"32 replicas in all .* \(4 × 6 = 24\)"):
        check_replica_counts(m, {k: 3 for k in m.keys() if k[0] == 1})


@pytest.mark.parametrize(("max_moves", "min_gain"), [(-1, None), (None, -0.5), (None, float("nan")),
                                                     (None, float("inf")), (3, float("-inf"))])
def test_a_rebalance_knob_out_of_range_is_refused_whatever_the_load(max_moves, min_gain) -> None:
    """Checked before the Controller looks for measured load: a bad argument is INVALID_ARGUMENT,
    never the FAILED_PRECONDITION of a model with no load yet."""
    m, _ = _model(family_spec("mixtral"))
    with pytest.raises(InvalidArgument, match="max_moves >= 0 and a finite min_gain >= 0"):
        rebalance_knob(m, max_moves, min_gain)


def test_a_rebalance_knob_left_unset_is_the_specs() -> None:
    spec = family_spec("mixtral", autoscaling={"rebalance_max_moves": 7, "rebalance_min_gain": 0.01})
    m, _ = _model(spec)
    assert rebalance_knob(m, None, None) == (7, 0.01)
    assert rebalance_knob(m, 0, 0.5) == (0, 0.5)


@pytest.mark.parametrize("replicas", [-1, 1, 15, 65])
def test_a_rebalance_total_below_one_per_expert_or_past_what_hosts_could_hold_is_refused(
        replicas: int) -> None:
    m, _ = _model(family_spec("mixtral"))  # 16 experts; 4 hosts at most × 16 slots
    with pytest.raises(InvalidArgument, match=r"must be 0 .* or 16 \(one per expert\) … 64"):
        check_rebalance_total(m, replicas)
    for fine in (0, 16, 64):
        check_rebalance_total(m, fine)


def test_a_poll_sums_the_models_rows_over_routers_and_smooths_them_into_its_load() -> None:
    model = ModelRecord.from_spec(family_spec("mixtral"))
    L = model.spec.layers[0]
    model.tokens_per_s = {(L, 0): 100.0}
    replies = [{"rows": {model.name: {L: {0: 30, 1: 10}}, "other": {L: {0: 999}}},
                "latency_s": {model.name: [0.01, 0.03]}},
               {"rows": {model.name: {L: {0: 10}}}, "latency_s": {}}]
    model.observe(replies, elapsed_s=2.0)
    # expert 0: 40 rows / 2 s = 20, smoothed with 100 at weight 0.5; expert 1 starts at its rate
    rates = model.tokens_per_s
    assert (rates[(L, 0)], rates[(L, 1)], rates[(L, 2)]) == (60.0, 5.0, 0.0)
    assert set(model.tokens_per_s) == set(model.keys())
    assert model.latency == {"p50_s": 0.01, "p99_s": 0.03, "requests_per_s": 1.0}
