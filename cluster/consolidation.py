"""Consolidation: `hosts_to_drain` picks lightly used hosts to empty, `drain` moves their
replicas elsewhere, keeping every expert's replica count (the emptied hosts can then retire).
"""

# Legend: K = (layer, expert id) key, H = host id, R = replica (one slot of one H holding one K).
#   load[K] = tokens/s routed to expert K; each of its replicas carries load[K] / replicas of K.

from __future__ import annotations

from .planning import Key, Placement, PlacementPlan, _diff, _Fleet, _shares

__all__ = ["hosts_to_drain", "drain"]


def hosts_to_drain(host_replicas: dict[str, int], capacity: dict[str, int], max_moves: int,
                   min_hosts: int, spare: float) -> list[str]:
    """Which lightly used hosts to empty now, so that they can be retired: O(H).

    host_replicas[H] = replicas H holds now; capacity[H] slots. Hosts holding replicas, fewest
    first (fewest moves per host freed), while their replicas total at most max_moves, at
    least min_hosts hosts with replicas stay, and the hosts that stay keep at least `spare` (a
    share) of their slots free once they hold every replica. Empty hosts are left to
    `autoscale.retirable`.
    """
    live = sorted((n, h) for h, n in host_replicas.items() if n > 0 and capacity.get(h, 0) > 0)
    total = sum(n for n, _ in live)
    slots = sum(capacity[h] for _, h in live)
    out, moves = [], 0
    for n, h in live:
        slots -= capacity[h]
        if (moves + n > max_moves or len(live) - len(out) - 1 < min_hosts
                or total > (1 - spare) * slots):
            break
        out.append(h)
        moves += n
    return out


def drain(load: dict[Key, float], capacity: dict[str, int], current: Placement,
          hosts: list[str]) -> tuple[PlacementPlan, list[str]]:
    """Move every replica off `hosts` -> (the plan, the hosts it empties).

    load[K] tokens/s; capacity[H] slots; current K -> [H]. Host by host, each replica, heaviest
    first, goes to the least-loaded H with a free slot that does not hold K and is not being
    drained (as `apply_counts` places a new one). A host whose replicas do not all find room
    keeps them all: a half-drained host saves nothing. Counts are unchanged; moves are the net
    change from `current` (each replica moved is one remove and one add).
    """
    closed = set(hosts)
    fleet = _Fleet({h: 0 if h in closed else c for h, c in capacity.items()}, current,
                   _shares(load, current, {}))
    emptied = []
    for src in hosts:
        added = []
        for k in sorted(fleet.held.get(src, ()), key=lambda k: (-fleet.share[k], k)):
            dst = fleet.coolest(k)  # src holds K, so it is never picked
            if dst is None:
                break
            fleet.add(k, dst)
            added.append((k, dst))
        if len(added) < len(fleet.held.get(src, ())):
            for k, dst in added:
                fleet.remove(k, dst)
            continue
        for k, _ in added:
            fleet.remove(k, src)
        emptied.append(src)
    return PlacementPlan(fleet.placement, _diff(current, fleet.placement), []), emptied
