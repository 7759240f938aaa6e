"""router/gating.py: every gating variant picks the experts and weights HF's maths gives.

Worked examples use an identity gate (H = E, so the logits are x) and logits chosen so the
scores come out as round numbers: x = log(p) under softmax, x = logit(p) under sigmoid. The
expected ids and weights are then worked out by hand in the comments. Random-input tests hold
`route` to a per-token Python loop written here (the slow twin) and to the stated properties.

# T = tokens, H = hidden, E = experts, K = experts per token, G = groups
"""

from __future__ import annotations

import math

import pytest
import torch

from moefleet.core.config import MoEConfig
from moefleet.router.gating import Gate, route, scores

pytestmark = pytest.mark.unit


def _cfg(n_experts: int, k: int, **kw) -> MoEConfig:
    return MoEConfig(hidden_size=kw.pop("hidden_size", n_experts), moe_intermediate_size=8,
                     n_routed_experts=n_experts, num_experts_per_tok=k, **kw)


def _softmax_logits(p: list[list[float]]) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log().float()  # softmax(log p) = p when Σp = 1


def _sigmoid_logits(p: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(p, dtype=torch.float64)
    return (t / (1 - t)).log().float()  # sigmoid(logit p) = p


def _identity_gate(n: int, bias: list[float] | None = None, n_group: int = 1) -> Gate:
    b = None if bias is None else torch.tensor(bias)
    return Gate.dense(torch.eye(n), b, n_group)


def _by_id(w: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each token's (weight, id) pairs by id: the contract is the set, not the order."""
    order = ids.argsort(dim=-1)  # [T, K]
    return w.gather(1, order), ids.gather(1, order)


def _assert_routes(got: tuple[torch.Tensor, torch.Tensor], ids: list[list[int]],
                   w: list[list[float]]) -> None:
    got_w, got_ids = _by_id(*got)
    torch.testing.assert_close(got_ids, torch.tensor(ids))
    torch.testing.assert_close(got_w, torch.tensor(w))


# ---- worked examples -----------------------------------------------------------------------

SOFTMAX_P = [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]


def test_softmax_topk_without_renorm_returns_the_raw_probabilities() -> None:
    # Token 0 keeps experts 3 (0.4) and 2 (0.3); token 1 keeps 0 (0.4) and 1 (0.3).
    cfg = _cfg(4, 2)
    got = route(_softmax_logits(SOFTMAX_P), _identity_gate(4), cfg)
    _assert_routes(got, [[2, 3], [0, 1]], [[0.3, 0.4], [0.4, 0.3]])


def test_softmax_topk_with_renorm_and_scaling_worked_example() -> None:
    # Renormalised: 0.3 / 0.7 = 3/7 and 0.4 / 0.7 = 4/7; then × 2.0 -> 6/7 and 8/7.
    cfg = _cfg(4, 2, norm_topk_prob=True, routed_scaling_factor=2.0)
    got = route(_softmax_logits(SOFTMAX_P), _identity_gate(4), cfg)
    _assert_routes(got, [[2, 3], [0, 1]], [[6 / 7, 8 / 7], [8 / 7, 6 / 7]])


# E = 8 in 4 groups of 2. Group maxima: g0 0.30, g1 0.22, g2 0.03, g3 0.20 -> keep g0 and g1.
# Plain greedy top-3 would take 1 (0.30), 2 (0.22) and 6 (0.20, in masked g3); group-limited
# must take 3 (0.18) instead of 6.
V2_P = [[0.04, 0.30, 0.22, 0.18, 0.01, 0.03, 0.20, 0.02]]


def test_group_limited_greedy_worked_example_skips_the_better_expert_in_a_masked_group() -> None:
    cfg = _cfg(8, 3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               routed_scaling_factor=2.0)
    got = route(_softmax_logits(V2_P), _identity_gate(8, n_group=4), cfg)
    _assert_routes(got, [[1, 2, 3]], [[0.60, 0.44, 0.36]])


def test_plain_greedy_on_the_same_scores_takes_the_masked_groups_expert() -> None:
    # The control for the example above: without group limiting, expert 6 wins over 3.
    cfg = _cfg(8, 3, routed_scaling_factor=2.0)
    got = route(_softmax_logits(V2_P), _identity_gate(8), cfg)
    _assert_routes(got, [[1, 2, 6]], [[0.60, 0.44, 0.40]])


# DeepSeek-V3 noaux_tc, E = 8 in 4 groups of 2, keep 2 groups, K = 2, norm, × 2.5.
V3_P = [[0.9, 0.1, 0.5, 0.4, 0.7, 0.6, 0.2, 0.3]]
V3_BIAS = [0.0, 0.0, 0.0, 0.0, -0.5, -0.5, 0.4, 0.4]


def _v3_cfg(**kw) -> MoEConfig:
    base = dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                norm_topk_prob=True, routed_scaling_factor=2.5)
    return _cfg(8, 2, **{**base, **kw})


def test_noaux_tc_without_bias_worked_example() -> None:
    # Group sums: g0 1.0, g1 0.9, g2 1.3, g3 0.5 -> keep g2, g0. Top-2: 0 (0.9), 4 (0.7).
    # Renormalised 0.9/1.6 = 0.5625, 0.7/1.6 = 0.4375; × 2.5 -> 1.40625, 1.09375.
    got = route(_sigmoid_logits(V3_P), _identity_gate(8, [0.0] * 8, n_group=4), _v3_cfg())
    _assert_routes(got, [[0, 4]], [[1.40625, 1.09375]])


def test_noaux_tc_bias_steers_the_choice_but_weights_use_unbiased_scores() -> None:
    # Biased: [0.9, 0.1, 0.5, 0.4, 0.2, 0.1, 0.6, 0.7]; group sums g0 1.0, g1 0.9, g2 0.3,
    # g3 1.3 -> keep g3, g0. Top-2 biased: 0 (0.9), 7 (0.7). Weights from the unbiased scores
    # 0.9 and 0.3: renormalised 0.75, 0.25; × 2.5 -> 1.875, 0.625.
    got = route(_sigmoid_logits(V3_P), _identity_gate(8, V3_BIAS, n_group=4), _v3_cfg())
    _assert_routes(got, [[0, 7]], [[1.875, 0.625]])


def test_noaux_tc_without_renorm_scales_the_raw_sigmoid_scores() -> None:
    # Same choice as above; weights 0.9 and 0.3, × 2.5 -> 2.25 and 0.75.
    cfg = _v3_cfg(norm_topk_prob=False)
    got = route(_sigmoid_logits(V3_P), _identity_gate(8, V3_BIAS, n_group=4), cfg)
    _assert_routes(got, [[0, 7]], [[2.25, 0.75]])


def test_noaux_tc_never_picks_a_masked_group_when_every_biased_score_is_negative() -> None:
    # A bias of -2 everywhere makes every biased score negative and shifts each group sum by
    # -4, so the kept groups stay g2 and g0 and the choice stays {0, 4}. (Masking to 0.0, as
    # HF does, would instead make every masked expert beat the kept ones.)
    bias = [-2.0] * 8
    got = route(_sigmoid_logits(V3_P), _identity_gate(8, bias, n_group=4), _v3_cfg())
    _assert_routes(got, [[0, 4]], [[1.40625, 1.09375]])


def test_sigmoid_greedy_takes_the_top_scores_with_no_groups() -> None:
    # Top-2 of V3_P: 0 (0.9), 4 (0.7); no renorm, scale 1.
    cfg = _cfg(8, 2, scoring_func="sigmoid")
    got = route(_sigmoid_logits(V3_P), _identity_gate(8), cfg)
    _assert_routes(got, [[0, 4]], [[0.9, 0.7]])


def test_noncontiguous_expert_ids_are_returned_as_logical_ids() -> None:
    # Rows 0..3 carry logical ids 40, 7, 13, 2; the softmax example picks rows 3 and 2 for
    # token 0 (-> ids 2, 13) and rows 0 and 1 for token 1 (-> ids 40, 7).
    gate = Gate(torch.eye(4), torch.tensor([40, 7, 13, 2]), torch.zeros(4, dtype=torch.long))
    got = route(_softmax_logits(SOFTMAX_P), gate, _cfg(4, 2))
    _assert_routes(got, [[2, 13], [7, 40]], [[0.4, 0.3], [0.3, 0.4]])


def test_unequal_groups_worked_example() -> None:
    # Rows (id, group): (10,g0) (11,g0) (12,g0) (20,g1) (30,g2) (31,g2), group sizes 3, 1, 2.
    # Scores [0.5, 0.45, 0.4, 0.8, 0.6, 0.1]. noaux_tc group score = sum of top-2 (a group of
    # one counts its one): g0 0.95, g1 0.8, g2 0.7 -> keep g0, g1. Top-2: 20 (0.8), 10 (0.5).
    # Weights 0.8, 0.5, no renorm, scale 1.
    gate = Gate(torch.eye(6), torch.tensor([10, 11, 12, 20, 30, 31]),
                torch.tensor([0, 0, 0, 1, 2, 2]), torch.zeros(6))
    cfg = MoEConfig(hidden_size=6, moe_intermediate_size=8, n_routed_experts=6,
                    num_experts_per_tok=2, scoring_func="sigmoid", topk_method="noaux_tc",
                    n_group=3, topk_group=2)
    got = route(_sigmoid_logits([[0.5, 0.45, 0.4, 0.8, 0.6, 0.1]]), gate, cfg)
    _assert_routes(got, [[10, 20]], [[0.5, 0.8]])


# ---- the slow twin -------------------------------------------------------------------------


def _route_loop(x: torch.Tensor, gate: Gate, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One token at a time, straight from the definitions: score, bias for choice, group
    scores, keep the best topk_group groups, pick top-K inside them, weigh by the unbiased
    scores, renormalise, scale."""
    weight = gate.weight.double()
    bias = [0.0] * weight.shape[0] if gate.bias is None else gate.bias.tolist()
    groups: dict[int, list[int]] = {}
    for row, g in enumerate(gate.group_ids.tolist()):
        groups.setdefault(g, []).append(row)
    limited = cfg.group_limited
    out_w, out_ids = [], []
    for t in range(x.shape[0]):
        logits = weight @ x[t].double()  # [E]
        s = (logits.softmax(0) if cfg.scoring_func == "softmax" else logits.sigmoid()).tolist()
        choice = [si + bi for si, bi in zip(s, bias, strict=True)]
        rows = list(range(len(s)))
        if limited:
            group_score = {g: _group_score([choice[r] for r in members], cfg.topk_method)
                           for g, members in groups.items()}
            kept = sorted(groups, key=group_score.__getitem__, reverse=True)[: cfg.topk_group]
            rows = [r for g in kept for r in groups[g]]
        chosen = sorted(rows, key=lambda r: choice[r], reverse=True)[: cfg.num_experts_per_tok]
        w = [s[r] for r in chosen]
        if cfg.norm_topk_prob:  # transformers renormalises for K == 1 too (weight 1)
            total = sum(w)
            w = [wi / total for wi in w]
        out_w.append([wi * cfg.routed_scaling_factor for wi in w])
        out_ids.append([int(gate.expert_ids[r]) for r in chosen])
    return torch.tensor(out_w, dtype=torch.float32), torch.tensor(out_ids, dtype=torch.long)


def _group_score(member_choices: list[float], method: str) -> float:
    """V3: the sum of the group's two best biased scores (its one, for a group of one);
    V2: the group's best score."""
    best = sorted(member_choices, reverse=True)
    return sum(best[:2]) if method == "noaux_tc" else best[0]


GROUPED_COMBOS = [  # (E, n_group, topk_group, K)
    (8, 4, 2, 2),
    (16, 4, 2, 4),
    (16, 8, 3, 6),
    (12, 3, 1, 3),
    (6, 2, 1, 1),
    (32, 8, 4, 8),
]


def _random_gate(n: int, h: int, n_group: int, biased: bool, seed: int) -> Gate:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, h, generator=g) / h**0.5
    bias = 0.5 * torch.randn(n, generator=g) if biased else None
    return Gate.dense(weight, bias, n_group)


@pytest.mark.parametrize("combo", GROUPED_COMBOS, ids=lambda c: "E{}-G{}-keep{}-K{}".format(*c))
@pytest.mark.parametrize(
    "variant",
    [
        dict(scoring_func="softmax", topk_method="group_limited_greedy"),
        dict(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=True),
        dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
             routed_scaling_factor=2.5),
        dict(scoring_func="sigmoid", topk_method="noaux_tc", routed_scaling_factor=1.5),
    ],
    ids=["v2", "v2-renorm", "v3-renorm", "v3"],
)
def test_grouped_routing_matches_the_per_token_loop(combo: tuple, variant: dict) -> None:
    n, n_group, topk_group, k = combo
    h = 16
    cfg = _cfg(n, k, hidden_size=h, n_group=n_group, topk_group=topk_group, **variant)
    gate = _random_gate(n, h, n_group, variant["topk_method"] == "noaux_tc", seed=n * 100 + k)
    x = torch.randn(64, h, generator=torch.Generator().manual_seed(k))
    _assert_same_routes(route(x, gate, cfg), _route_loop(x, gate, cfg))


@pytest.mark.parametrize(
    ("method", "bias_shift"),
    [("group_limited_greedy", 0.0), ("noaux_tc", 0.0), ("noaux_tc", -2.0)],
    ids=["v2", "v3", "v3-all-negative-bias"],
)
def test_unequal_groups_and_noncontiguous_ids_match_the_per_token_loop(
    method: str, bias_shift: float
) -> None:
    # 9 rows with arbitrary logical ids in groups of sizes 4, 1, 0 (group 2 has lost all its
    # experts), 3 and 1: an empty group must never be kept, even when every real group's
    # score is negative.
    ids = torch.tensor([3, 8, 9, 15, 21, 22, 40, 41, 77])
    groups = torch.tensor([0, 0, 0, 0, 1, 3, 3, 3, 4])
    g = torch.Generator().manual_seed(5)
    h = 16
    bias = 0.5 * torch.randn(9, generator=g) + bias_shift if method == "noaux_tc" else None
    gate = Gate(torch.randn(9, h, generator=g) / h**0.5, ids, groups, bias)
    func = "sigmoid" if method == "noaux_tc" else "softmax"
    cfg = MoEConfig(hidden_size=h, moe_intermediate_size=8, n_routed_experts=10,
                    num_experts_per_tok=3, scoring_func=func, topk_method=method, n_group=5,
                    topk_group=3, norm_topk_prob=True)
    x = torch.randn(64, h, generator=g)
    got = route(x, gate, cfg)
    _assert_same_routes(got, _route_loop(x, gate, cfg))
    assert set(got[1].unique().tolist()) <= set(ids.tolist())


def _assert_same_routes(got: tuple, want: tuple) -> None:
    got_w, got_ids = _by_id(*got)
    want_w, want_ids = _by_id(*want)
    torch.testing.assert_close(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w)


# ---- properties ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["group_limited_greedy", "noaux_tc"])
@pytest.mark.parametrize("bias_shift", [0.0, -3.0], ids=["bias", "all-negative-bias"])
def test_grouped_routing_never_picks_more_groups_than_topk_group(method: str,
                                                                 bias_shift: float) -> None:
    n, n_group, topk_group, k, h = 32, 8, 2, 6, 16
    func = "sigmoid" if method == "noaux_tc" else "softmax"
    cfg = _cfg(n, k, hidden_size=h, scoring_func=func, topk_method=method, n_group=n_group,
               topk_group=topk_group)
    gate = _random_gate(n, h, n_group, biased=True, seed=11)
    gate = Gate.dense(gate.weight, gate.bias + bias_shift, n_group)
    x = torch.randn(256, h, generator=torch.Generator().manual_seed(12))
    _, ids = route(x, gate, cfg)
    groups_used = (ids // (n // n_group)).sort(dim=-1).values  # [T, K]
    distinct = 1 + (groups_used[:, 1:] != groups_used[:, :-1]).sum(-1)  # [T]
    assert int(distinct.max()) <= topk_group
    assert all(len(set(row)) == k for row in ids.tolist())  # K distinct experts per token


def test_noaux_tc_bias_changes_the_choice_but_weights_equal_the_unbiased_scores() -> None:
    n, h = 16, 16
    cfg = _cfg(n, 4, hidden_size=h, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4,
               topk_group=2, routed_scaling_factor=1.0)
    biased = _random_gate(n, h, 4, biased=True, seed=21)
    plain = Gate.dense(biased.weight, None, 4)
    x = torch.randn(128, h, generator=torch.Generator().manual_seed(22))
    w_b, ids_b = route(x, biased, cfg)
    _, ids_p = route(x, plain, cfg)
    changed = (ids_b.sort(-1).values != ids_p.sort(-1).values).any(-1)  # [T]
    assert int(changed.sum()) > 0, "the bias should change some tokens' experts"
    s = scores(x, biased, cfg)  # [T, E], unbiased
    torch.testing.assert_close(w_b, s.gather(1, ids_b))  # dense gate: id == row


@pytest.mark.parametrize(
    "variant",
    [
        dict(scoring_func="softmax"),
        dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2),
        dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2),
        dict(scoring_func="sigmoid"),
    ],
    ids=["softmax", "v2", "v3", "sigmoid"],
)
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_renormalised_weights_sum_to_the_scaling_factor(variant: dict, k: int,
                                                        scale: float) -> None:
    n, h = 16, 16
    cfg = _cfg(n, k, hidden_size=h, norm_topk_prob=True, routed_scaling_factor=scale, **variant)
    gate = _random_gate(n, h, 4, variant.get("topk_method") == "noaux_tc", seed=31)
    x = torch.randn(64, h, generator=torch.Generator().manual_seed(32))
    w, _ = route(x, gate, cfg)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.full((64,), scale))


def test_renormalised_single_expert_gets_weight_equal_to_the_scaling_factor() -> None:
    # Qwen2/Qwen3-MoE, OLMoE and Mixtral renormalise whatever K is: one expert gets weight 1.
    cfg = _cfg(8, 1, norm_topk_prob=True, routed_scaling_factor=2.0)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(33))
    w, _ = route(x, _random_gate(8, 8, 1, False, seed=34), cfg)
    torch.testing.assert_close(w, torch.full((16, 1), 2.0))


@pytest.mark.parametrize(
    "variant",
    [
        dict(scoring_func="softmax"),
        dict(scoring_func="softmax", norm_topk_prob=True),
        dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2),
        dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2),
        dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
             norm_topk_prob=True),
    ],
    ids=["softmax", "softmax-renorm", "v2", "v3", "v3-renorm"],
)
def test_scaling_factor_multiplies_the_weights_and_leaves_the_choice(variant: dict) -> None:
    n, h = 16, 16
    gate = _random_gate(n, h, 4, variant.get("topk_method") == "noaux_tc", seed=41)
    x = torch.randn(64, h, generator=torch.Generator().manual_seed(42))
    w1, ids1 = route(x, gate, _cfg(n, 3, hidden_size=h, **variant))
    w3, ids3 = route(x, gate, _cfg(n, 3, hidden_size=h, routed_scaling_factor=3.0, **variant))
    torch.testing.assert_close(ids3, ids1)
    torch.testing.assert_close(w3, 3.0 * w1)


def test_unnormalised_softmax_weights_are_the_chosen_probabilities() -> None:
    n, h = 16, 16
    cfg = _cfg(n, 4, hidden_size=h)
    gate = _random_gate(n, h, 1, False, seed=51)
    x = torch.randn(64, h, generator=torch.Generator().manual_seed(52))
    w, ids = route(x, gate, cfg)
    p = (x.double() @ gate.weight.double().T).softmax(-1)  # [T, E]
    torch.testing.assert_close(w, p.gather(1, ids).float())
    # and they are the K largest: every unchosen probability is at most the smallest chosen
    rest = p.scatter(1, ids, -math.inf)
    assert bool((rest.max(-1).values <= p.gather(1, ids).min(-1).values).all())


def test_relabelling_rows_changes_only_the_returned_ids() -> None:
    n, h = 16, 16
    cfg = _cfg(n, 4, hidden_size=h, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4,
               topk_group=2, norm_topk_prob=True)
    dense = _random_gate(n, h, 4, True, seed=61)
    labels = torch.randperm(1000, generator=torch.Generator().manual_seed(62))[:n] + 5
    relabelled = Gate(dense.weight, labels, dense.group_ids, dense.bias)
    x = torch.randn(64, h, generator=torch.Generator().manual_seed(63))
    w_d, ids_d = route(x, dense, cfg)
    w_r, ids_r = route(x, relabelled, cfg)
    torch.testing.assert_close(w_r, w_d)
    torch.testing.assert_close(ids_r, labels[ids_d])


def test_empty_batch_routes_to_empty_outputs() -> None:
    cfg = _v3_cfg()
    w, ids = route(torch.randn(0, 8), _identity_gate(8, V3_BIAS, n_group=4), cfg)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


@pytest.mark.parametrize("method", ["group_limited_greedy", "noaux_tc"])
@pytest.mark.parametrize("seed", range(6))
def test_dense_group_view_routes_exactly_as_the_scatter_into_groups(method: str, seed: int) -> None:
    n, n_group, topk_group, k, h = 32, 8, 3, 6, 16
    func = "sigmoid" if method == "noaux_tc" else "softmax"
    cfg = _cfg(n, k, hidden_size=h, scoring_func=func, topk_method=method, n_group=n_group,
               topk_group=topk_group, norm_topk_prob=True)
    gate = _random_gate(n, h, n_group, biased=method == "noaux_tc", seed=seed)
    assert gate._dense, "Gate.dense rows are in the padded [G, S] order"
    scatter = Gate(gate.weight, gate.expert_ids, gate.group_ids, gate.bias)
    object.__setattr__(scatter, "_dense", False)  # the general path, as for unequal groups
    x = torch.randn(40, h, generator=torch.Generator().manual_seed(seed))
    for got, want in zip(route(x, gate, cfg), route(x, scatter, cfg), strict=True):
        assert torch.equal(got, want)


def test_rows_out_of_group_order_are_not_taken_for_the_dense_layout() -> None:
    ids = torch.arange(8)
    assert Gate(torch.randn(8, 4), ids, ids // 2)._dense
    assert not Gate(torch.randn(8, 4), ids, torch.tensor([0, 1, 0, 1, 2, 3, 2, 3]))._dense
    assert not Gate(torch.randn(7, 4), ids[:7], ids[:7] // 2)._dense  # last group has one


# ---- on the router's GPU -------------------------------------------------------------------

_CUDA_VARIANTS = [  # (E, n_group, topk_group, K, variant)
    (8, 1, 1, 2, dict()),
    (16, 1, 1, 4, dict(norm_topk_prob=True, routed_scaling_factor=2.0)),
    (64, 8, 3, 6, dict(topk_method="group_limited_greedy", routed_scaling_factor=16.0)),
    (256, 8, 4, 8, dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                        routed_scaling_factor=2.5)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("combo", _CUDA_VARIANTS, ids=["softmax", "softmax-renorm", "v2", "v3"])
def test_routing_on_cuda_matches_the_per_token_loop(combo: tuple) -> None:
    n, n_group, topk_group, k, variant = combo
    h = 64
    cfg = _cfg(n, k, hidden_size=h, n_group=n_group, topk_group=topk_group, **variant)
    gate = _random_gate(n, h, n_group, variant.get("topk_method") == "noaux_tc", seed=n + k)
    x = torch.randn(128, h, generator=torch.Generator().manual_seed(n))
    on_gpu = gate.to("cuda")
    assert on_gpu._dense == gate._dense
    w, ids = route(x.cuda(), on_gpu, cfg)
    assert w.is_cuda and ids.is_cuda
    _assert_same_routes((w.cpu(), ids.cpu()), _route_loop(x, gate, cfg))
