"""What `moefleet simulate` writes: summary.{json,csv}, and PNG plots over time, one line per
policy: hosts in use, p99 layer latency against the budget, per-host max/mean rows and
cumulative GB of weights moved. The plots need matplotlib (the `sim` extra)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .run import Series, Summary, simulate, summarise, table
from .scenario import Scenario, load_scenario

__all__ = ["run", "plot"]

_POINTS = 600  # at most this many points per line: each is one bin of periods


def plot(sc: Scenario, series: dict[str, Series], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install 'moefleet[sim]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    gb = sc.model.expert_bytes / 1e9
    top = 100 * sc.slo_s * 1e3  # a saturated host's infinite latency is drawn here
    panels = [(ax[0, 0], "hosts in use", lambda s: s.hosts, np.mean),
              (ax[0, 1], f"p99 layer latency (ms), bin max; saturated at {top:g}",
               lambda s: np.minimum(s.p99_s * 1e3, top), np.max),
              (ax[1, 0], "per-host max/mean rows", lambda s: s.imbalance, np.mean),
              (ax[1, 1], "GB of weights moved", lambda s: s.replicas_moved * gb, np.max)]
    for a, title, get, reduce in panels:
        for name, s in series.items():
            t, y = _bin(get(s), sc.autoscaling.period_s, reduce)
            a.plot(t, y, label=name, lw=1)
        a.set_title(title, fontsize=9)
    ax[0, 1].axhline(sc.slo_s * 1e3, color="k", ls="--", lw=0.8, label="budget")
    ax[0, 1].set_yscale("log")
    ax[0, 1].legend(fontsize=7)
    for a in ax[1]:
        a.set_xlabel("hours")
    fig.suptitle(sc.name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _bin(y: np.ndarray, period_s: float, reduce) -> tuple[np.ndarray, np.ndarray]:
    """[P] -> (hours, values) with at most _POINTS bins, each reduced by `reduce`."""
    w = max(1, len(y) // _POINTS)
    y = y[: len(y) // w * w].reshape(-1, w)
    return (np.arange(len(y)) + 0.5) * w * period_s / 3600, reduce(y, axis=1)


def run(path: str, out_dir: str, progress: bool = True) -> str:
    """The `moefleet simulate` command: simulate, write summary.{json,csv} and plots.png to
    out_dir, return the comparison table."""
    sc = load_scenario(path)
    series = simulate(sc, progress)
    summaries = summarise(sc, series)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=2))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Summary.__dataclass_fields__))
        w.writeheader()
        w.writerows(asdict(s) for s in summaries)
    plot(sc, series, out / "plots.png")
    return table(summaries, sc.slo_s)
