"""Placement: which host slot holds which expert replica. Pure functions over plain data.

For now, the initial placement: one replica per expert, dealt round-robin over the hosts so
every host carries an even share of each layer. Load-aware, migration-aware replanning grows
here later (the elasticity issue).
"""

from __future__ import annotations

__all__ = ["initial_placement"]


def initial_placement(
    layers: list[int], n_experts: int, host_slots: list[int]
) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """host_slots[h]: free slots of host h -> {(layer, expert): [(host, slot)]}.

    Raises ValueError when the hosts cannot hold one replica of every expert.
    """
    need, have = len(layers) * n_experts, sum(host_slots)
    if need > have:
        raise ValueError(f"{need} experts ({len(layers)} layers × {n_experts}) need {need} slots; "
                         f"the hosts have {have}: raise hosts.count or hosts.slots")
    used = [0] * len(host_slots)
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    h = 0
    for layer in layers:
        for e in range(n_experts):
            while used[h] >= host_slots[h]:
                h = (h + 1) % len(host_slots)
            out[(layer, e)] = [(h, used[h])]
            used[h] += 1
            h = (h + 1) % len(host_slots)
    return out
