"""Benchmark: how fast and how well the service changes shape under load, on one local Ray.

One embedded Ray and one service (`service.start`) serve a small random-weight layer (H=64,
I=48, E=16, K=2, softmax top-k renormalised) from 4 ExpertHost actors. Client threads here send
[T, H] requests whose tokens sit near chosen experts' gate rows (x = 4 · row/|row| + 0.3 · noise),
so the bench decides which experts get the rows. Three measurements, printed as one table, and
a fourth on a service of its own:

    reaction    autoscaling on (upscale delay 0, smoothing 1, downscale delay 1 s), with a
                target_tokens_per_s the uniform load stays under; the load steps so one expert
                gets every token. Timed from the step to the first answer served on a routing
                version >= the one at which `Status` first shows the hot expert's new replica;
                repeated after the autoscaler scales it back down.
    balance     Zipf-popular experts (exponent 1.1): per-replica and per-host max/mean token
                load from `Status` before and after `Rebalance(replicas = 1.5 × E)`, beside the
                least per-replica max/mean any placement of that many replicas reaches.
    add/remove  `AddExpert` of an expert with a large gate row, then requests aligned to it until
                one reports a version >= the response's (checked against the reference with the
                new expert); then `RemoveExpert`. Under the Zipf load.
    spike       experts of H=spike_hidden, I=spike_inter (24 MB each in fp32) on the same 4
                hosts, under the Zipf load: request latency p50 / p99 in the measure_s / 2
                before `Rebalance(replicas = spike_spare × E)` against while it runs; once
                with hosts.loads_per_host = slots (every load at once), once with 1.

It times the control plane, not the maths (the experts are tiny), in wall seconds on a shared,
noisy machine.

    .venv/bin/python bench/elastic.py            # the full run (about 1 minute)
    .venv/bin/python bench/elastic.py --quick    # fewer repeats, shorter load windows
    .venv/bin/python bench/elastic.py --parts spike   # the spike measurement alone

# T = tokens per request, H = hidden, E = experts, R = replicas
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

import grpc
import ray
import torch

from moefleet.client import Client
from moefleet.cluster import placement, service
from moefleet.cluster.model import gate_of, source_of
from moefleet.cluster.spec import ModelSpec
from moefleet.experts.reference import ExpertWeights
from moefleet.testing import Reference, VersionedReference, expert_file, random_expert

LAYER = 0
HOT = 3  # the expert the reaction step makes hot
AMP, NOISE = 4.0, 0.3  # inputs: AMP · unit gate row + NOISE · randn
NEW_ROW_SCALE = 4.0  # the added expert's gate row is this much larger than the spec's rows
TARGET = {"reaction_s": 5.0, "balance": 1.15}


@dataclasses.dataclass
class Settings:
    experts: int = 16
    hosts: int = 4
    slots: int = 12  # per host
    threads: int = 3  # load threads
    tokens: int = 16  # T per request
    pause_s: float = 0.005  # each load thread's pause between requests
    repeats: int = 3  # reaction steps
    adds: int = 5  # add/remove rounds
    measure_s: float = 5.0  # seconds of load before each reading of measured tokens/s
    target_factor: float = 3.0  # target_tokens_per_s = this × mean expert rate, uniform load
    zipf: float = 1.1
    spare: float = 1.5  # rebalance to R = spare × experts
    ray_cpus: int = 4  # logical
    spike_hidden: int = 1024  # the spike measurement's layer: experts large enough that
    spike_inter: int = 2048  # loading them takes a while (24 MB each in fp32)
    spike_spare: float = 3.0  # rebalance to R = spike_spare × experts
    parts: str = "all"  # "all", or "spike" for the spike measurement alone


def make_spec(s: Settings, hidden: int = 64, inter: int = 48) -> ModelSpec:
    return ModelSpec.from_dict({
        "name": "bench-elastic", "layers": [LAYER], "dtype": "float32",
        "moe": {"hidden_size": hidden, "moe_intermediate_size": inter, "n_routed_experts": s.experts,
                "num_experts_per_tok": 2, "norm_topk_prob": True},
        "weights": {"random": {"seed": 0}},
        "hosts": {"count": s.hosts, "max_count": s.hosts, "num_cpus": 0.25, "slots": s.slots},
        "router": {"num_cpus": 0.25},
        # the policy for the reaction step, off until then; SetAutoscaling sets only the target
        "autoscaling": {"enabled": False, "smoothing": 1.0, "period_s": 0.25, "max_replicas": 2,
                        "upscale_delay_s": 0.0, "downscale_delay_s": 1.0},
    })


# ---- load ---------------------------------------------------------------------------------


def near(rows: torch.Tensor, probs: torch.Tensor, t: int, g: torch.Generator) -> torch.Tensor:
    """rows: [E, H] unit gate rows; probs: [E] -> x [T, H], each token near one drawn row."""
    pick = torch.multinomial(probs, t, replacement=True, generator=g)  # [T]
    return AMP * rows[pick] + NOISE * torch.randn(t, rows.shape[1], generator=g)


class Load:
    """`threads` clients sending `make_x(g)` until stopped; `make_x` may be swapped meanwhile.
    Every answer is kept as (monotonic time it came back, routing version that served it), and
    its latency as (monotonic time it was sent, seconds)."""

    def __init__(self, address: str, model: str, s: Settings, make_x: Callable):
        self.make_x = make_x
        self.answers: list[tuple[float, int]] = []
        self.latencies: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(address, model, s, i), daemon=True)
                         for i in range(s.threads)]
        for w in self._workers:
            w.start()

    def _run(self, address: str, model: str, s: Settings, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with Client(address, retries=0) as c:
            while not self._stop.wait(s.pause_s):
                x, t0 = self.make_x(g), time.monotonic()
                try:
                    _, version = c.infer_with_version(model, LAYER, x, timeout_s=30)
                except grpc.RpcError as e:
                    self.errors.append(f"{e.code().name}: {e.details()}")
                    continue
                t1 = time.monotonic()
                self.answers.append((t1, version))
                self.latencies.append((t0, t1 - t0))

    def first_after(self, t0: float, version: int) -> float | None:
        """Seconds from t0 to the first answer after t0 served on `version` or later."""
        return min((t - t0 for t, v in list(self.answers) if t >= t0 and v >= version), default=None)

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=30)


def wait_for(predicate: Callable, timeout_s: float, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval_s)
    return None


# ---- reading Status -----------------------------------------------------------------------


def snapshot(c: Client, model: str) -> tuple[int, dict, placement.Placement, list[str]]:
    """One Status -> (routing version, load K -> tokens/s, placement K -> [H], every host id)."""
    st = c.status(model)
    (m,) = st.models
    ex = {(L.layer, e.expert): e for L in m.layers for e in L.experts}
    return (m.routing_version, {k: e.tokens_per_s for k, e in ex.items()},
            {k: [r.host for r in e.replicas] for k, e in ex.items()}, [h.id for h in st.hosts])


def max_over_mean(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else float("nan")


def imbalance(load: dict, where: placement.Placement, hosts: list[str]) -> tuple[float, float]:
    """-> (per-replica, per-host) max/mean token load; hosts holding nothing count as 0."""
    per_host = placement.host_loads(load, where)
    return (max_over_mean(placement.replica_loads(load, where)),
            max_over_mean([per_host.get(h, 0.0) for h in hosts]))


# ---- 1. reaction --------------------------------------------------------------------------


def hot_version(c: Client, model: str, n: int, fewer: bool = False) -> int:
    """The routing version once HOT has >= n replicas (<= n with `fewer`), else 0."""
    version, _, where, _ = snapshot(c, model)
    have = len(where[(LAYER, HOT)])
    return version if (have <= n if fewer else have >= n) else 0


def measure_reaction(c: Client, addr: str, spec: ModelSpec, rows: torch.Tensor, s: Settings) -> dict:
    e = spec.moe.n_routed_experts
    uniform = partial(near, rows, torch.full((e,), 1.0 / e), s.tokens)
    hot = partial(near, rows, torch.nn.functional.one_hot(torch.tensor(HOT), e).float(), s.tokens)
    load = Load(addr, spec.name, s, uniform)
    time.sleep(s.measure_s)
    rates = list(snapshot(c, spec.name)[1].values())
    target = s.target_factor * statistics.mean(rates)
    c.set_autoscaling(spec.name, enabled=True, target_tokens_per_s=target)
    out = {"target": target, "uniform_max": max(rates), "published_s": [], "served_s": []}
    for _ in range(s.repeats):
        t0, load.make_x = time.monotonic(), hot
        version = wait_for(lambda: hot_version(c, spec.name, 2), 30)
        published = time.monotonic() - t0
        served = version and wait_for(partial(load.first_after, t0, version), 30)
        out["published_s"].append(published if version else None)
        out["served_s"].append(served or None)
        load.make_x = uniform
        wait_for(lambda: hot_version(c, spec.name, 1, fewer=True), 30)
        time.sleep(1.0)  # some controller periods of uniform load before the next step
    load.stop()
    c.set_autoscaling(spec.name, enabled=False)
    c.scale_expert(spec.name, layer=LAYER, replicas=1)
    out["errors"] = load.errors
    return out


# ---- 2. balance ---------------------------------------------------------------------------


def zipf_probs(e: int, exponent: float) -> torch.Tensor:
    """[E] popularity: the expert of rank r (a fixed random order) gets ∝ 1 / r^exponent."""
    rank = torch.empty(e)
    rank[torch.randperm(e, generator=torch.Generator().manual_seed(1))] = torch.arange(1.0, e + 1)
    p = rank ** -exponent
    return p / p.sum()


def measure_balance(c: Client, spec: ModelSpec, s: Settings) -> dict:
    """Under the Zipf load, which the caller runs."""
    time.sleep(s.measure_s)
    before = imbalance(*snapshot(c, spec.name)[1:])
    r = round(s.spare * spec.moe.n_routed_experts)
    resp = c.rebalance(spec.name, replicas=r)
    time.sleep(s.measure_s)
    _, tokens, where, hosts = snapshot(c, spec.name)
    after = imbalance(tokens, where, hosts)
    need = [next((n for n in range(len(tokens), 8 * len(tokens) + 1)
                  if replica_bound(tokens, n, cap) <= TARGET["balance"]), None)
            for cap in (len(hosts), None)]
    return {"replicas": r, "before": before, "after": after, "resp": resp, "hosts": len(hosts),
            "bound": replica_bound(tokens, r, len(hosts)), "bound_uncapped": replica_bound(tokens, r),
            "need": need, "placed": sum(len(h) for h in where.values())}


def replica_bound(load: dict, r: int, cap: int | None = None) -> float:
    """The least per-replica max/mean any placement of r replicas reaches for `load`
    (`replicate` minimises the max share; `cap` replicas at most per expert)."""
    counts = placement.replicate(load, r, max_replicas=cap)
    return max_over_mean(placement.replica_loads(load, {k: [""] * n for k, n in counts.items()}))


# ---- 3. add / remove ----------------------------------------------------------------------


def new_expert(spec: ModelSpec, seed: int) -> tuple[torch.Tensor, ExpertWeights, bytes]:
    """A random expert with a gate row NEW_ROW_SCALE times the spec's: (row [H], weights,
    the safetensors file AddExpert takes)."""
    row, _, w = random_expert(spec, seed, NEW_ROW_SCALE)  # this layer has no selection bias
    return row, w, expert_file(row, w)


def measure_add_remove(c: Client, spec: ModelSpec, s: Settings) -> dict:
    rounds, g, ref = [], torch.Generator().manual_seed(2), VersionedReference(spec)
    for i in range(s.adds):
        row, w, data = new_expert(spec, seed=100 + i)
        t0 = time.monotonic()
        resp = c.add_expert(spec.name, layer=LAYER, safetensors=data)
        ref.added(resp.routing_version, LAYER, resp.expert, row, w)
        t1, version = time.monotonic(), 0
        while version < resp.routing_version:  # aligned requests until one runs on it
            x = near((row / row.norm())[None], torch.ones(1), s.tokens, g)
            y, version = c.infer_with_version(spec.name, LAYER, x)
        t2 = time.monotonic()
        torch.testing.assert_close(y, ref(version, LAYER, x))
        share = (ref.route(version, LAYER, x)[1] == resp.expert).any(-1).float().mean().item()
        t3 = time.monotonic()
        r = c.remove_expert(spec.name, layer=LAYER, expert=resp.expert)
        ref.removed(r.routing_version, LAYER, resp.expert)
        rounds.append((t1 - t0, t2 - t1, time.monotonic() - t3, share))
    cols = zip(*rounds, strict=True)
    return dict(zip(("add_s", "first_s", "remove_s", "share"), map(list, cols), strict=True))


# ---- 4. latency during a rebalance ------------------------------------------------------------


def p50_p99(latencies: list[float]) -> tuple[float, float]:
    s = sorted(latencies)
    return s[(len(s) - 1) // 2], s[min(len(s) - 1, round(0.99 * len(s)) - 1)]


def measure_spike(s: Settings, loads_per_host: int) -> dict:
    """Its own service, with experts of spike_hidden × spike_inter, under the Zipf load:
    latencies of the requests sent in the measure_s before `Rebalance(spike_spare × E)` (steady
    state, less the first second) against those sent while it runs."""
    spec = make_spec(s, s.spike_hidden, s.spike_inter)
    spec.hosts.loads_per_host = loads_per_host
    svc = service.start(spec, port=0)
    try:
        w = gate_of(spec, LAYER, source_of(spec)).weight
        probs = zipf_probs(s.experts, s.zipf)
        load = Load(svc.address, spec.name, s, partial(near, w / w.norm(dim=1, keepdim=True),
                                                       probs, s.tokens))
        with Client(svc.address) as c:
            time.sleep(s.measure_s)  # steady state, and load for the Controller to measure
            t0 = time.monotonic()
            resp = c.rebalance(spec.name, replicas=round(s.spike_spare * s.experts))
            t1 = time.monotonic()
            time.sleep(1.0)
        load.stop()
    finally:
        svc.shutdown()
    before = [d for t, d in load.latencies if t0 - s.measure_s + 1 <= t < t0]
    during = [d for t, d in load.latencies if t0 <= t < t1]
    return {"before": p50_p99(before), "during": p50_p99(during), "n": (len(before), len(during)),
            "rebalance_s": t1 - t0, "resp": resp, "errors": load.errors,
            "mb_per_expert": 3 * s.spike_hidden * s.spike_inter * 4 / 2**20,
            "loads_per_host": loads_per_host}


def report_spike(spikes: list[dict]) -> None:
    print(f"\nrebalance under load ({spikes[0]['mb_per_expert']:.0f} MB experts), by "
          f"hosts.loads_per_host; latencies in ms, before → during")
    print("| loads_per_host | moves | rebalance s | requests before / during | p50 | p50 ratio | "
          "p99 | p99 ratio | errors |\n|---:|---:|---:|---|---|---:|---|---:|---:|")
    for sp in spikes:
        (b50, b99), (d50, d99), r = sp["before"], sp["during"], sp["resp"]
        print(f"| {sp['loads_per_host']} | {r.moves} | {sp['rebalance_s']:.2f} | {sp['n'][0]} / "
              f"{sp['n'][1]} | {1e3 * b50:.0f} → {1e3 * d50:.0f} | {d50 / b50:.2f} | "
              f"{1e3 * b99:.0f} → {1e3 * d99:.0f} | {d99 / b99:.2f} | {len(sp['errors'])} |")


# ---- the report ---------------------------------------------------------------------------


def _med_max(xs: list[float | None]) -> str:
    if None in xs:
        return f"{xs.count(None)}/{len(xs)} timed out"
    return f"{statistics.median(xs):.2f} / {max(xs):.2f}"


def _verdict(value: float | None, bound: float) -> str:
    return "met" if value is not None and value <= bound else "MISSED"


def report(react: dict, bal: dict, addrm: dict, errors: list[str]) -> None:
    served, (rb, hb), (ra, ha), rsp = react["served_s"], bal["before"], bal["after"], bal["resp"]
    t_s, t_bal = TARGET["reaction_s"], TARGET["balance"]
    rows = [
        ("reaction: step → answer on a version with the new replica, median / max s",
         _med_max(served), f"≤ {t_s}", _verdict(None if None in served else max(served), t_s)),
        ("reaction: step → new replica in Status, median / max s", _med_max(react["published_s"])),
        (f"balance: per-replica max/mean, before → after (R={bal['replicas']})",
         f"{rb:.2f} → {ra:.2f}", f"≤ {t_bal}", _verdict(ra, t_bal)),
        (f"balance: per-replica lower bound, ≤ 1 replica per host ({bal['hosts']} hosts) / uncapped",
         f"{bal['bound']:.2f} / {bal['bound_uncapped']:.2f}"),
        (f"balance: fewest R with a per-replica bound ≤ {t_bal}, capped / uncapped",
         " / ".join("none ≤ 8E" if n is None else str(n) for n in bal["need"])),
        ("balance: per-host max/mean, before → after", f"{hb:.2f} → {ha:.2f}", f"≤ {t_bal}",
         _verdict(ha, t_bal)),
        ("balance: Rebalance's own per-replica max/mean, before → after",
         f"{rsp.imbalance_before:.2f} → {rsp.imbalance_after:.2f}"),
        ("balance: moves / moves from scratch", f"{rsp.moves} / {rsp.moves_from_scratch}"),
        ("add: AddExpert call, median / max s", _med_max(addrm["add_s"])),
        ("add: AddExpert return → first answer using it, median / max s", _med_max(addrm["first_s"])),
        ("remove: RemoveExpert call, median / max s", _med_max(addrm["remove_s"])),
    ]
    print(f"\nreaction: target_tokens_per_s {react['target']:.0f}; under the uniform load the "
          f"busiest expert measured {react['uniform_max']:.0f} tokens/s")
    print("| measurement | figure | target | verdict |\n|---|---:|---|---|")
    for row in rows:
        print("| " + " | ".join((*row, "", "")[:4]) + " |")
    print(f"\nadd: probe tokens routed to the new expert {min(addrm['share']):.0%}.."
          f"{max(addrm['share']):.0%}, answers match the reference with it; "
          f"{bal['placed']} replicas placed after the rebalance; load errors: {len(errors)}"
          + (f", first: {errors[0]}" if errors else ""))


def _machine() -> str:
    """Date, CPU model, cores, load, versions and the moefleet revision, on one line."""
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    git = ["git", "-C", os.path.dirname(os.path.abspath(__file__)), "describe", "--always", "--dirty"]
    rev = subprocess.run(git, capture_output=True, text=True).stdout.strip() or "?"
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}  {cpu}  cores={os.cpu_count()}  "
            f"load={os.getloadavg()[0]:.2f}  torch={torch.__version__}  ray={ray.__version__}  "
            f"moefleet={rev}")


def run(s: Settings) -> None:
    spec = make_spec(s)
    print(_machine())
    print(f"command: {' '.join(sys.argv)}\nsettings: {s}", flush=True)
    service.connect_ray("local", num_cpus=s.ray_cpus)
    try:
        if s.parts != "spike":
            run_elastic(spec, s)
        report_spike([measure_spike(s, n) for n in (s.slots, 1)])  # all at once, then rounds
    finally:
        ray.shutdown()


def run_elastic(spec: ModelSpec, s: Settings) -> None:
    svc = None
    try:
        svc = service.start(spec, port=0)
        ref = Reference(spec)
        w = ref.gates[LAYER].weight
        rows = w / w.norm(dim=1, keepdim=True)  # [E, H]
        with Client(svc.address) as c:
            react = measure_reaction(c, svc.address, spec, rows, s)
            print("  reaction done", flush=True)
            zipf = Load(svc.address, spec.name, s,
                        partial(near, rows, zipf_probs(s.experts, s.zipf), s.tokens))
            bal = measure_balance(c, spec, s)
            print("  balance done", flush=True)
            addrm = measure_add_remove(c, spec, s)  # under the Zipf load
            zipf.stop()
        report(react, bal, addrm, react["errors"] + zipf.errors)
    finally:
        if svc is not None:
            svc.shutdown()


def parse_args(argv: list[str] | None = None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 steps, 3 adds, 3 s load windows")
    for f in dataclasses.fields(Settings):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default))
    a = ap.parse_args(argv)
    s = Settings(repeats=2, adds=3, measure_s=3.0) if a.quick else Settings()
    for name, value in vars(a).items():
        if name != "quick" and value is not None:
            setattr(s, name, value)
    return s


if __name__ == "__main__":
    run(parse_args())
