"""cluster/placement.py: the initial placement puts one replica of every expert into a free
slot, never overfills a host, spreads each layer evenly, and says why when it cannot fit.
"""

from __future__ import annotations

from collections import Counter

import pytest

from moefleet.cluster.placement import initial_placement

pytestmark = pytest.mark.unit

CASES = [  # (layers, experts, host_slots)
    ([0], 8, [4, 4]),
    ([0, 1], 16, [16, 16]),
    ([3, 7, 9], 6, [5, 5, 5, 5]),
    ([0, 1], 5, [3, 3, 3, 3]),
    ([0], 64, [64]),
    ([2, 5], 10, [20, 20, 20]),
]


def _check_valid(out: dict, layers: list[int], n: int, host_slots: list[int]) -> None:
    assert set(out) == {(layer, e) for layer in layers for e in range(n)}
    assert all(len(reps) == 1 for reps in out.values()), "exactly one replica each"
    used = [rep for reps in out.values() for rep in reps]
    assert len(set(used)) == len(used), "no slot holds two experts"
    for h, s in used:
        assert 0 <= h < len(host_slots) and 0 <= s < host_slots[h]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{len(c[0])}-E{c[1]}-H{len(c[2])}")
def test_every_expert_gets_one_slot_within_its_hosts_capacity(case: tuple) -> None:
    layers, n, host_slots = case
    _check_valid(initial_placement(layers, n, host_slots), layers, n, host_slots)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{len(c[0])}-E{c[1]}-H{len(c[2])}")
def test_equal_hosts_share_the_experts_and_each_layer_evenly(case: tuple) -> None:
    layers, n, host_slots = case
    out = initial_placement(layers, n, host_slots)
    total = Counter(reps[0][0] for reps in out.values())
    loads = [total.get(h, 0) for h in range(len(host_slots))]
    assert max(loads) - min(loads) <= 1, loads
    for layer in layers:
        per = Counter(out[(layer, e)][0][0] for e in range(n))
        per_loads = [per.get(h, 0) for h in range(len(host_slots))]
        assert max(per_loads) - min(per_loads) <= 1, (layer, per_loads)


def test_a_small_host_fills_up_and_the_rest_spread_over_the_others() -> None:
    # 12 experts on hosts of 2, 10 and 10 slots: the small host takes 2, the others 5 each.
    out = initial_placement([0], 12, [2, 10, 10])
    _check_valid(out, [0], 12, [2, 10, 10])
    assert Counter(reps[0][0] for reps in out.values()) == {0: 2, 1: 5, 2: 5}


def test_a_host_with_no_free_slots_gets_nothing() -> None:
    out = initial_placement([0, 1], 4, [0, 4, 4])
    _check_valid(out, [0, 1], 4, [0, 4, 4])
    assert Counter(reps[0][0] for reps in out.values()) == {1: 4, 2: 4}


def test_an_exact_fit_uses_every_slot() -> None:
    out = initial_placement([0, 1, 2], 4, [3, 5, 4])
    used = sorted(rep for reps in out.values() for rep in reps)
    assert used == [(0, s) for s in range(3)] + [(1, s) for s in range(5)] + \
        [(2, s) for s in range(4)]


@pytest.mark.parametrize(("layers", "n", "host_slots", "need", "have"), [
    ([0, 1], 8, [4, 4, 4], 16, 12),
    ([0], 3, [], 3, 0),
    ([0], 9, [8], 9, 8),
])
def test_too_few_slots_raises_a_clear_error(layers, n, host_slots, need, have) -> None:
    with pytest.raises(ValueError, match=rf"need {need} slots; the hosts have {have}") as err:
        initial_placement(layers, n, host_slots)
    assert "hosts.count or hosts.slots" in str(err.value)


def test_no_layers_places_nothing() -> None:
    assert initial_placement([], 8, [4]) == {}
