"""Benchmark: the placement planner's balance and moves against a plan from scratch. Pure; no Ray.

For each (experts E, hosts, slots per host, load) it builds a current placement, a new load,
and then runs `rebalance` (migration-aware) and `plan_from_scratch` (the EPLB-style greedy
replicate-and-pack) for the same load and replica total. Three situations:

    bring-up    current = one replica per expert dealt round robin; replicas = every slot
                (no free slot anywhere: the case where single moves cannot help)
    drift       current = a from-scratch plan for the load; new load = load × lognormal(0, 0.2)
    rotation    current = a from-scratch plan for the load; the hottest 10% of experts swap
                their loads with randomly chosen colder ones

Balance is per-host tokens/s, max / mean (1.0 is perfect). Moves are replicas added plus
removed from the current placement; from scratch, the plan as it comes (hosts not relabelled).
Each row is the median over seeds; "worse" counts seeds where rebalance's balance exceeds
scratch's by more than 0.5%.

    .venv/bin/python bench/placement.py            # 5 seeds per row
    .venv/bin/python bench/placement.py --seeds 2  # quicker

# E = experts, R = replicas
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from moefleet.cluster.placement import Key, Placement, imbalance, plan_from_scratch, rebalance

SIZES = [(16, 2, 16), (64, 8, 9), (128, 16, 9), (256, 32, 9), (256, 64, 5), (256, 64, 16)]
LOADS = ["zipf0.8", "zipf1.2", "zipf1.5", "lognormal"]


def make_load(rng: random.Random, n: int, kind: str) -> dict[Key, float]:
    """n experts -> tokens/s: Zipf 1000 / rank**s in a random order, or lognormal(0, 1)."""
    if kind == "lognormal":
        return {(0, e): 1000.0 * rng.lognormvariate(0.0, 1.0) for e in range(n)}
    s = float(kind.removeprefix("zipf"))
    w = [1000.0 / (r + 1) ** s for r in range(n)]
    rng.shuffle(w)
    return {(0, e): w[e] for e in range(n)}


def situation(rng: random.Random, name: str, load: dict[Key, float], capacity: dict[str, int],
              num: int) -> tuple[Placement, dict[Key, float]]:
    """(current placement, the load to plan for)."""
    hosts = sorted(capacity)
    if name == "bring-up":
        return {k: [hosts[i % len(hosts)]] for i, k in enumerate(sorted(load))}, load
    current = plan_from_scratch(load, capacity, num, max_replicas=len(hosts)).placement
    if name == "drift":
        return current, {k: v * rng.lognormvariate(0.0, 0.2) for k, v in load.items()}
    ranked = sorted(load, key=load.get, reverse=True)
    hot, cold = ranked[: max(1, len(ranked) // 10)], ranked[len(ranked) // 10:]
    new = dict(load)
    for k, other in zip(hot, rng.sample(cold, len(hot)), strict=True):
        new[k], new[other] = load[other], load[k]
    return current, new


def pairs(p: Placement) -> set[tuple[Key, str]]:
    return {(k, h) for k, hs in p.items() for h in hs}


def row(n: int, nh: int, slots: int, kind: str, name: str, seeds: int) -> list:
    out = []
    for seed in range(seeds):
        rng = random.Random(seed)
        capacity = {f"h{i:02d}": slots for i in range(nh)}
        num = nh * slots if name == "bring-up" else min(nh * slots, n * 5 // 4)
        current, load = situation(rng, name, make_load(rng, n, kind), capacity, num)
        t0 = time.perf_counter()
        plan = rebalance(load, capacity, current, num, max_replicas=nh)
        dt = time.perf_counter() - t0
        scratch = plan_from_scratch(load, capacity, num, max_replicas=nh)
        out.append((imbalance(load, capacity, plan.placement),
                    imbalance(load, capacity, scratch.placement),
                    len(plan.moves), len(pairs(current) ^ pairs(scratch.placement)), dt,
                    len(plan.unplaced)))
    med = [statistics.median(c) for c in zip(*out, strict=True)]
    worse = sum(a > b * 1.005 + 1e-9 for a, b, *_ in out)
    return [f"{n}/{nh}/{slots}", kind, name, f"{med[1]:.3f}", f"{med[0]:.3f}", worse,
            f"{med[3]:.0f}", f"{med[2]:.0f}", f"{med[3] / max(med[2], 1):.1f}×",
            f"{max(o[5] for o in out)}", f"{1000 * max(o[4] for o in out):.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    head = ["E/hosts/slots", "load", "situation", "scratch max/mean", "rebalance max/mean",
            "worse", "scratch moves", "rebalance moves", "fewer moves", "unplaced", "max ms"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for n, nh, slots in SIZES:
        for kind in LOADS:
            for name in ("bring-up", "drift", "rotation"):
                print("| " + " | ".join(map(str, row(n, nh, slots, kind, name, args.seeds))) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
