"""Benchmark: how long `moefleet.sim` takes per simulated period, and where the time goes.

Runs a scenario (default: the DeepSeek-V3 day) for `--minutes` of simulated time from
`--start-hour` (its diurnal curve shifted so that the slice starts there; the fleet starts
fresh) under cProfile, and prints the wall time, the time per period, the day it extrapolates
to, and the share of the time spent in the policies (autoscale, the placement planner), the
cost model and the load generator (cumulative: rebalance and plan_from_scratch include their
apply_counts).

    .venv/bin/python bench/sim_speed.py --minutes 5 --start-hour 11
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import time

from moefleet.sim import load_scenario, simulate

_PARTS = {  # function name -> part of the time it is counted in (cumulative time)
    "expert_targets": "autoscale (expert_targets)",
    "apply_counts": "placement.apply_counts, Planner",
    "plan_from_scratch": "placement.plan_from_scratch",
    "pack_from_scratch": "placement.pack_from_scratch",
    "rebalance": "placement.rebalance",
    "drain": "placement.drain",
    "profile": "cost model: profile",
    "evaluate": "cost model: evaluate",
    "chunk": "load generator",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", nargs="?", default="deploy/examples/sim/deepseek-v3-day.yaml")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--start-hour", type=float, default=0.0)
    a = ap.parse_args()
    full = load_scenario(a.scenario)
    load = dataclasses.replace(full.load, peak_hour=full.load.peak_hour - a.start_hour)
    sc = dataclasses.replace(full, duration_s=a.minutes * 60, load=load)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    simulate(sc)
    prof.disable()
    wall = time.perf_counter() - t0
    per = wall / sc.periods
    print(f"{sc.name}: {sc.periods} periods × {len(sc.policies)} policies in {wall:.1f} s "
          f"({per * 1e3:.1f} ms per period); the full {full.duration_s / 3600:g} h extrapolates to "
          f"{per * full.periods / 60:.0f} min")
    stats = pstats.Stats(prof).stats
    for fn, part in _PARTS.items():
        cum = sum(v[3] for k, v in stats.items() if k[2] == fn)
        print(f"  {part:<28} {cum:8.1f} s  {cum / wall:6.1%}")


if __name__ == "__main__":
    main()
