"""router/engine.py: gate -> plan -> hosts -> combine gives what the monolithic reference
layer gives, in every gating variant, and the engine's errors are the domain errors.

The hosts are plain `ExpertHost` objects reached through the same wire conversion the Ray
path uses (`to_wire` / `from_wire`), so only the Ray hop itself is left out. The reference is
`MoELayer` fed with `route(...)`, with the experts made by the same `RandomSource`.

# T = tokens, H = hidden, INTER = expert intermediate, E = routed experts
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from moefleet.core.config import MoEConfig
from moefleet.core.errors import HostGone, InvalidArgument, NotFound, Unavailable
from moefleet.experts.host import ExpertHost, from_wire, to_wire
from moefleet.experts.reference import MoELayer
from moefleet.experts.weights import RandomSource
from moefleet.router.dispatch import HostBatch, LayerTable
from moefleet.router.engine import Engine, LayerState, ModelState
from moefleet.router.gating import Gate, route

pytestmark = pytest.mark.unit

H, INTER, E = 32, 48, 8
LAYER = 3
N_HOSTS, SLOTS = 3, 8

VARIANTS = {
    "mixtral": dict(num_experts_per_tok=2, norm_topk_prob=True),
    "olmoe": dict(num_experts_per_tok=3),
    "qwen2-gated-shared": dict(num_experts_per_tok=2, shared_expert_intermediate_size=40),
    "deepseek-v2": dict(num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
                        topk_group=2, routed_scaling_factor=1.5, n_shared_experts=2),
    "deepseek-v3": dict(num_experts_per_tok=3, scoring_func="sigmoid", topk_method="noaux_tc",
                        n_group=4, topk_group=2, norm_topk_prob=True,
                        routed_scaling_factor=2.5, n_shared_experts=1),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: with one intra-op thread, OpenMP wake-ups (tens of ms each on a
    busy machine) stay out of the run time. The process's setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(variant: str) -> MoEConfig:
    return MoEConfig(hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=E,
                     **VARIANTS[variant])


def _source(cfg: MoEConfig, seed: int = 0) -> RandomSource:
    return RandomSource(seed=seed, hidden_size=H, intermediate_size=INTER, n_routed_experts=E,
                        shared_intermediate_size=cfg.shared_intermediate_size,
                        shared_expert_gate=cfg.shared_expert_gate,
                        gate_bias=cfg.topk_method == "noaux_tc")


def _host(i: int) -> ExpertHost:
    # num_cpus = the current thread count (1 here), so building a host changes nothing
    return ExpertHost(f"h{i}", SLOTS, num_cpus=torch.get_num_threads(), device="cpu")


async def _call_host(host: ExpertHost, x: torch.Tensor, b: HostBatch) -> torch.Tensor:
    arr, dtype = to_wire(x)
    y, y_dtype = host.run(x=arr, dtype=dtype, slot_ids=b.slot_ids.tolist(), counts=b.counts.tolist())
    return from_wire(y, y_dtype)


Replicas = dict[int, list[tuple[int, int]]]


def _replicas(ids: list[int]) -> Replicas:
    """Expert i (the i-th id) on host i % 3; the first and the last id get a second replica."""
    reps = {e: [(i % N_HOSTS, i // N_HOSTS)] for i, e in enumerate(ids)}
    reps[ids[0]].append((1, SLOTS - 1))
    reps[ids[-1]].append((2, SLOTS - 1))
    return reps


def _two_replicas(ids: list[int]) -> Replicas:
    """Expert i on hosts i % 3 and (i + 1) % 3: any one host can go."""
    return {e: [(i % N_HOSTS, i // N_HOSTS), ((i + 1) % N_HOSTS, SLOTS - 1 - i // N_HOSTS)]
            for i, e in enumerate(ids)}


def _everywhere(ids: list[int]) -> Replicas:
    """Expert i in slot i of every host."""
    return {e: [(h, i) for h in range(N_HOSTS)] for i, e in enumerate(ids)}


def _build(cfg: MoEConfig, ids: list[int] | None = None, version: int = 1, seed: int = 0,
           name: str = "m", layout: Callable[[list[int]], Replicas] = _replicas,
           ) -> tuple[ModelState, MoELayer, Gate]:
    """A model with one MoE layer on fresh hosts, and the reference layer it must match."""
    ids = list(range(E)) if ids is None else ids
    src = _source(cfg, seed)
    gw = src.gate(LAYER)
    groups = torch.arange(E) // (E // max(cfg.n_group, 1))
    gate = Gate(gw.weight, torch.tensor(ids), groups, gw.bias)
    hosts = [_host(i) for i in range(N_HOSTS)]
    reps = layout(ids)
    for row, e in enumerate(ids):
        for h, slot in reps[e]:
            hosts[h].load_weights(slot=slot, layer=LAYER, expert=e, weights=src.expert(LAYER, row))
    shared = src.shared(LAYER)
    layer = LayerState(gate, LayerTable.from_replicas(reps), shared)
    state = ModelState(name, cfg, torch.float32, version, {LAYER: layer}, hosts,
                       [h.host_id for h in hosts])
    reference = MoELayer({e: src.expert(LAYER, row) for row, e in enumerate(ids)}, shared)
    return state, reference, gate


def _expected(reference: MoELayer, gate: Gate, cfg: MoEConfig, x: torch.Tensor) -> torch.Tensor:
    return reference(x, *route(x, gate, cfg))


def _x(t: int, seed: int) -> torch.Tensor:
    return torch.randn(t, H, generator=torch.Generator().manual_seed(seed))


# ---- parity with the reference ---------------------------------------------------------------


# On a GPU the router runs gating, combine and the shared experts there; the hosts stay on the
# CPU here, as a router's GPU serves hosts elsewhere.
_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("t", [0, 1, 7, 64, 300])  # 300: the pure steps run on a worker thread
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_matches_the_reference_layer(variant: str, t: int, device: str) -> None:
    cfg = _cfg(variant)
    state, reference, gate = _build(cfg)
    engine = Engine(_call_host, device=device)
    engine.install(state)
    x = _x(t, seed=t)
    y, version = asyncio.run(engine.forward("m", LAYER, x))
    assert version == 1 and y.dtype == x.dtype and y.device == x.device and y.shape == (t, H)
    torch.testing.assert_close(y, _expected(reference, gate, cfg, x))


@pytest.mark.parametrize("variant", ["deepseek-v3", "qwen2-gated-shared"])
def test_shared_experts_are_added_to_the_routed_output(variant: str) -> None:
    cfg = _cfg(variant)
    state, reference, gate = _build(cfg)
    engine = Engine(_call_host, device="cpu")
    engine.install(state)
    x = _x(7, seed=70)
    y, _ = asyncio.run(engine.forward("m", LAYER, x))
    routed_only = MoELayer(reference.experts)(x, *route(x, gate, cfg))
    shared = state.layers[LAYER].shared
    torch.testing.assert_close(y, routed_only + shared(x))
    assert (y - routed_only).abs().max() > 1e-3, "the shared experts contribute"


def test_noncontiguous_expert_ids_match_the_reference() -> None:
    cfg = _cfg("deepseek-v3")
    state, reference, gate = _build(cfg, ids=[2, 5, 11, 12, 20, 21, 33, 40])
    engine = Engine(_call_host, device="cpu")
    engine.install(state)
    x = _x(64, seed=80)
    y, _ = asyncio.run(engine.forward("m", LAYER, x))
    torch.testing.assert_close(y, _expected(reference, gate, cfg, x))


def test_every_host_call_is_issued_before_the_shared_experts_run() -> None:
    cfg = _cfg("deepseek-v3")
    state, reference, gate = _build(cfg)
    issued: list[str] = []

    def call_host(host: ExpertHost, x: torch.Tensor, b: HostBatch):  # issues now, like Ray
        issued.append(host.host_id)
        return _call_host(host, x, b)

    engine = Engine(call_host, device="cpu")
    engine.install(state)
    seen_by_shared: list[list[str]] = []
    shared = engine._shared
    engine._shared = lambda x, s: (seen_by_shared.append(list(issued)), shared(x, s))[1]
    x = _x(64, seed=85)
    y, _ = asyncio.run(engine.forward("m", LAYER, x))
    torch.testing.assert_close(y, _expected(reference, gate, cfg, x))
    assert seen_by_shared == [["h0", "h1", "h2"]] and issued == ["h0", "h1", "h2"]


def test_concurrent_requests_each_match_the_reference() -> None:
    cfg = _cfg("deepseek-v2")
    state, reference, gate = _build(cfg)
    engine = Engine(_call_host, device="cpu")
    engine.install(state)
    xs = [_x(t, seed=90 + t) for t in (1, 7, 5, 64)]

    async def main():
        return await asyncio.gather(*(engine.forward("m", LAYER, x) for x in xs))

    for x, (y, _) in zip(xs, asyncio.run(main()), strict=True):
        torch.testing.assert_close(y, _expected(reference, gate, cfg, x))


# ---- errors --------------------------------------------------------------------------------


@pytest.fixture
def served() -> tuple[Engine, MoELayer, Gate, MoEConfig]:
    cfg = _cfg("mixtral")
    state, reference, gate = _build(cfg)
    engine = Engine(_call_host, device="cpu")
    engine.install(state)
    return engine, reference, gate, cfg


def _still_answers(served: tuple) -> None:
    engine, reference, gate, cfg = served
    x = _x(7, seed=100)
    y, _ = asyncio.run(engine.forward("m", LAYER, x))
    torch.testing.assert_close(y, _expected(reference, gate, cfg, x))


@pytest.mark.parametrize(("model", "layer", "hidden", "error", "code", "words"), [
    ("nope", LAYER, H, NotFound, "NOT_FOUND", "unknown model 'nope'"),
    ("m", LAYER + 1, H, NotFound, "NOT_FOUND", "no MoE layer 4"),
    ("m", LAYER, H + 1, InvalidArgument, "INVALID_ARGUMENT", "hidden size 33"),
], ids=["unknown-model", "unknown-layer", "wrong-hidden-size"])
def test_bad_request_raises_its_domain_error_and_the_engine_still_answers(
    served: tuple, model: str, layer: int, hidden: int, error: type, code: str, words: str
) -> None:
    engine = served[0]
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(110))
    with pytest.raises(error, match=words) as err:
        engine.check(model, layer, x)
    assert err.value.code == code
    _still_answers(served)


def test_a_failing_host_gives_unavailable_and_the_engine_still_answers(served: tuple) -> None:
    engine = served[0]
    broken = Engine(_failing_call_host, device="cpu")
    broken.install(engine.state("m"))
    with pytest.raises(Unavailable, match="host h") as err:
        asyncio.run(broken.forward("m", LAYER, _x(7, seed=120)))
    assert err.value.code == "UNAVAILABLE"
    assert broken.dead_hosts == set() and broken.in_flight_rows == {}, "not HostGone: no retry"
    _still_answers(served)


@pytest.mark.parametrize("dropped", [
    pytest.param(0, id="inside-table"),
    pytest.param(E - 1, id="past-table-end"),
])
def test_an_expert_with_no_replica_gives_unavailable_and_the_engine_still_answers(
    served: tuple, dropped: int
) -> None:
    # A version whose table lost every replica of one expert (e.g. mid-migration); expert 7
    # is the table's largest id, so dropping it shortens the table itself.
    engine, _, gate, cfg = served
    st = engine.state("m")
    reps = {e: r for e, r in _replicas(list(range(E))).items() if e != dropped}
    layer = replace(st.layers[LAYER], table=LayerTable.from_replicas(reps))
    holed = Engine(_call_host, device="cpu")
    holed.install(replace(st, layers={LAYER: layer}))
    x = _x(64, seed=125)
    assert bool((route(x, gate, cfg)[1] == dropped).any()), "some token must pick it"
    with pytest.raises(Unavailable, match=rf"no replica for expert\(s\) \[{dropped}\]") as err:
        asyncio.run(holed.forward("m", LAYER, x))
    assert err.value.code == "UNAVAILABLE"
    _still_answers(served)


async def _failing_call_host(host: ExpertHost, x: torch.Tensor, b: HostBatch) -> torch.Tensor:
    raise ConnectionError(f"host {host.host_id} is gone")


# ---- versions ------------------------------------------------------------------------------


def test_a_request_started_before_install_reports_and_uses_the_old_version() -> None:
    cfg = _cfg("deepseek-v3")
    old, old_reference, old_gate = _build(cfg, version=1, seed=0)
    new, new_reference, new_gate = _build(cfg, version=2, seed=1)  # different weights
    entered, release = asyncio.Event(), asyncio.Event()

    async def held_call_host(host, x, b):
        entered.set()
        await release.wait()
        return await _call_host(host, x, b)

    engine = Engine(held_call_host, device="cpu")
    engine.install(old)
    x = _x(7, seed=130)

    async def main():
        running = asyncio.create_task(engine.forward("m", LAYER, x))
        await asyncio.wait_for(entered.wait(), 5.0)  # the request is at its hosts
        engine.install(new)
        release.set()
        y_old, v_old = await running
        y_new, v_new = await engine.forward("m", LAYER, x)
        return y_old, v_old, y_new, v_new

    y_old, v_old, y_new, v_new = asyncio.run(main())
    assert (v_old, v_new) == (1, 2)
    torch.testing.assert_close(y_old, _expected(old_reference, old_gate, cfg, x))
    torch.testing.assert_close(y_new, _expected(new_reference, new_gate, cfg, x))


def test_install_replaces_only_the_named_model() -> None:
    cfg = _cfg("olmoe")
    a, ref_a, gate_a = _build(cfg, name="a", seed=0)
    b, _, _ = _build(cfg, name="b", seed=1)
    engine = Engine(_call_host, device="cpu")
    engine.install(a)
    engine.install(b)
    engine.install(replace(b, version=7))
    assert engine.model_names() == ["a", "b"]
    x = _x(5, seed=140)
    y, v = asyncio.run(engine.forward("a", LAYER, x))
    assert v == 1
    torch.testing.assert_close(y, _expected(ref_a, gate_a, cfg, x))
    assert asyncio.run(engine.forward("b", LAYER, x))[1] == 7


# ---- hosts that go -------------------------------------------------------------------------


class _Fleet:
    """call_host over ExpertHost objects: records (host id, rows) per call, and raises
    HostGone for the hosts in `gone`."""

    def __init__(self, gone: set[str] = frozenset()):
        self.gone = set(gone)
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: ExpertHost, x: torch.Tensor, b: HostBatch) -> torch.Tensor:
        self.calls.append((host.host_id, x.shape[0]))
        if host.host_id in self.gone:
            raise HostGone(f"host {host.host_id} is gone")
        return await _call_host(host, x, b)

    def hosts_called(self) -> set[str]:
        return {h for h, _ in self.calls}


def _routed_rows(gate: Gate, cfg: MoEConfig, *xs: torch.Tensor) -> dict[int, int]:
    """expert id -> rows routed to it over the inputs, as take_rows reports them."""
    ids = torch.cat([route(x, gate, cfg)[1].reshape(-1) for x in xs])
    n = torch.bincount(ids)
    return {e: c for e, c in enumerate(n.tolist()) if c}


def test_rows_of_a_gone_host_are_retried_on_other_replicas_and_match_the_reference() -> None:
    cfg = _cfg("deepseek-v3")
    state, reference, gate = _build(cfg, layout=_two_replicas)
    fleet, told = _Fleet(gone={"h1"}), []
    engine = Engine(fleet, device="cpu", on_host_gone=told.append)
    engine.install(state)
    x = _x(64, seed=200)
    y, _ = asyncio.run(engine.forward("m", LAYER, x))
    torch.testing.assert_close(y, _expected(reference, gate, cfg, x))
    assert "h1" in fleet.hosts_called(), "the gone host was tried first"
    assert engine.dead_hosts == {"h1"} and told == ["h1"]
    assert engine.in_flight_rows == {}
    assert engine.take_rows() == {"m": {LAYER: _routed_rows(gate, cfg, x)}}, "retries count once"

    fleet.calls.clear()
    x2 = _x(33, seed=201)
    y2, _ = asyncio.run(engine.forward("m", LAYER, x2))
    torch.testing.assert_close(y2, _expected(reference, gate, cfg, x2))
    assert fleet.hosts_called() == {"h0", "h2"}, "the dead host is never called again"
    assert told == ["h1"], "on_host_gone is told once per host"


def test_rows_are_retried_until_a_live_replica_answers() -> None:
    # One token, two experts, each on all three hosts: with no load anywhere both rows go
    # to host 0, then (host 0 gone) to host 1, then (host 1 gone too) to host 2.
    cfg = _cfg("mixtral")
    state, reference, gate = _build(cfg, layout=_everywhere)
    fleet, told = _Fleet(gone={"h0", "h1"}), []
    engine = Engine(fleet, device="cpu", on_host_gone=told.append)
    engine.install(state)
    x = _x(1, seed=210)
    y, _ = asyncio.run(engine.forward("m", LAYER, x))
    torch.testing.assert_close(y, _expected(reference, gate, cfg, x))
    assert fleet.calls == [("h0", 2), ("h1", 2), ("h2", 2)]
    assert told == ["h0", "h1"] and engine.in_flight_rows == {}


def test_a_gone_host_with_an_experts_only_replica_gives_unavailable_then_avoiding_requests_pass(
) -> None:
    # _replicas: experts 1 and 4 live only on host 1
    cfg = _cfg("mixtral")
    state, reference, gate = _build(cfg)
    fleet, told = _Fleet(gone={"h1"}), []
    engine = Engine(fleet, device="cpu", on_host_gone=told.append)
    engine.install(state)
    x = _x(64, seed=220)
    ids = route(x, gate, cfg)[1]  # [T, K]
    assert bool((ids == 1).any() and (ids == 4).any()), "some tokens must pick them"
    with pytest.raises(Unavailable, match=r"\['h1'\] gone and no replica for expert\(s\) \[1, 4\]"
                       ) as err:
        asyncio.run(engine.forward("m", LAYER, x))
    assert err.value.code == "UNAVAILABLE"
    assert told == ["h1"] and engine.in_flight_rows == {}
    assert asyncio.run(engine.wait_drained("m", 2, timeout_s=0)), "the failed request ended"

    fleet.calls.clear()
    avoiding = x[~((ids == 1) | (ids == 4)).any(-1)]  # [T', H]
    assert avoiding.shape[0] > 0
    y, _ = asyncio.run(engine.forward("m", LAYER, avoiding))
    torch.testing.assert_close(y, _expected(reference, gate, cfg, avoiding))
    assert "h1" not in fleet.hosts_called()
    calls = len(fleet.calls)
    with pytest.raises(Unavailable, match=r"no replica for expert\(s\) \[1, 4\]"):
        asyncio.run(engine.forward("m", LAYER, x))  # planned without host 1 from the start
    assert len(fleet.calls) == calls, "refused before any host was called"


def test_install_forgets_dead_hosts_only_once_no_state_lists_them() -> None:
    cfg = _cfg("olmoe")
    state, reference, gate = _build(cfg, layout=_two_replicas)
    engine = Engine(_Fleet(gone={"h1"}), device="cpu")
    engine.install(state)
    x = _x(16, seed=230)
    asyncio.run(engine.forward("m", LAYER, x))
    assert engine.dead_hosts == {"h1"}
    engine.install(replace(state, version=2))  # still lists h1: still avoided
    assert engine.dead_hosts == {"h1"}
    # version 3 is what the controller publishes without h1: host 2 becomes index 1
    reps = {e: [(h // 2, s) for h, s in r if h != 1] for e, r in _two_replicas(list(range(E))).items()}
    layer = replace(state.layers[LAYER], table=LayerTable.from_replicas(reps))
    engine.install(replace(state, version=3, layers={LAYER: layer},
                           hosts=[state.hosts[0], state.hosts[2]], host_ids=["h0", "h2"]))
    assert engine.dead_hosts == set()
    y, v = asyncio.run(engine.forward("m", LAYER, x))
    assert v == 3
    torch.testing.assert_close(y, _expected(reference, gate, cfg, x))


def test_model_state_needs_one_id_per_host() -> None:
    state, _, _ = _build(_cfg("olmoe"))
    with pytest.raises(ValueError, match="3 hosts but 2 host ids"):
        replace(state, host_ids=["h0", "h1"])


# ---- load: outstanding rows and per-expert counts ------------------------------------------


class _HeldFleet:
    """call_host that records each call, then waits for `release` before answering."""

    def __init__(self):
        self.release = asyncio.Event()
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: ExpertHost, x: torch.Tensor, b: HostBatch) -> torch.Tensor:
        self.calls.append((host.host_id, x.shape[0]))
        await self.release.wait()
        return await _call_host(host, x, b)

    async def until_called(self, n: int) -> None:
        async def wait():
            while len(self.calls) < n:
                await asyncio.sleep(0)
        await asyncio.wait_for(wait(), 5.0)


def _held(state: ModelState) -> tuple[Engine, _HeldFleet]:
    """An engine whose host calls wait until the test releases them."""
    fleet = _HeldFleet()
    engine = Engine(fleet, device="cpu")
    engine.install(state)
    return engine, fleet


def test_outstanding_rows_steer_a_concurrent_single_row_to_the_other_replica() -> None:
    cfg = MoEConfig(hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=E,
                    num_experts_per_tok=1)
    state, reference, gate = _build(cfg, layout=_everywhere)
    engine, fleet = _held(state)
    x1, x2 = _x(1, seed=240), _x(1, seed=241)

    async def main():
        first = asyncio.create_task(engine.forward("m", LAYER, x1))
        await fleet.until_called(1)
        after_first = dict(engine.in_flight_rows)
        second = asyncio.create_task(engine.forward("m", LAYER, x2))
        await fleet.until_called(2)
        after_second = dict(engine.in_flight_rows)
        fleet.release.set()
        (y1, _), (y2, _) = await asyncio.gather(first, second)
        return after_first, after_second, y1, y2

    after_first, after_second, y1, y2 = asyncio.run(main())
    assert after_first == {"h0": 1}
    assert after_second == {"h0": 1, "h1": 1}
    assert fleet.calls == [("h0", 1), ("h1", 1)]
    assert engine.in_flight_rows == {}
    torch.testing.assert_close(y1, _expected(reference, gate, cfg, x1))
    torch.testing.assert_close(y2, _expected(reference, gate, cfg, x2))


def test_outstanding_holds_every_dispatched_row_until_its_host_answers() -> None:
    cfg = _cfg("olmoe")  # K = 3
    state, _, _ = _build(cfg, layout=_two_replicas)
    engine, fleet = _held(state)

    async def main():
        running = asyncio.create_task(engine.forward("m", LAYER, _x(20, seed=250)))
        await fleet.until_called(1)  # every call is issued before the first one runs
        held = dict(engine.in_flight_rows)
        fleet.release.set()
        await running
        return held

    held = asyncio.run(main())
    assert len(held) == N_HOSTS
    assert held == {h: n for h, n in fleet.calls} and sum(held.values()) == 20 * 3
    assert engine.in_flight_rows == {}


def test_take_rows_counts_the_rows_routed_to_each_expert_and_starts_afresh() -> None:
    cfg = _cfg("deepseek-v2")
    a, _, gate_a = _build(cfg, name="a", seed=0)
    b, _, gate_b = _build(cfg, name="b", seed=1, ids=[2, 5, 11, 12, 20, 21, 33, 40])
    engine = Engine(_call_host, device="cpu")
    engine.install(a)
    engine.install(b)
    xs = [_x(7, seed=260), _x(64, seed=261)]
    for x in xs:
        asyncio.run(engine.forward("a", LAYER, x))
    asyncio.run(engine.forward("b", LAYER, xs[0]))
    assert engine.take_rows() == {"a": {LAYER: _routed_rows(gate_a, cfg, *xs)},
                                  "b": {LAYER: _routed_rows(gate_b, cfg, xs[0])}}
    assert engine.take_rows() == {}
    asyncio.run(engine.forward("a", LAYER, xs[0]))
    assert engine.take_rows() == {"a": {LAYER: _routed_rows(gate_a, cfg, xs[0])}}


# ---- draining ------------------------------------------------------------------------------


def test_wait_drained_is_false_while_an_older_version_runs_and_true_once_it_ends() -> None:
    cfg = _cfg("mixtral")
    old, _, _ = _build(cfg, version=1)
    engine, fleet = _held(old)

    async def main():
        running = asyncio.create_task(engine.forward("m", LAYER, _x(5, seed=270)))
        await fleet.until_called(1)
        engine.install(replace(old, version=2))
        while_running = await engine.wait_drained("m", 2, timeout_s=0.05)
        waiter = asyncio.create_task(engine.wait_drained("m", 2, timeout_s=5.0))
        await asyncio.sleep(0.01)
        waiting = not waiter.done()
        fleet.release.set()
        drained = await asyncio.wait_for(waiter, 1.0)  # woken by the request's end
        _, version = await running
        return while_running, waiting, drained, version

    assert asyncio.run(main()) == (False, True, True, 1)


def test_wait_drained_is_true_at_once_when_nothing_runs(served: tuple) -> None:
    engine = served[0]
    assert asyncio.run(engine.wait_drained("m", 5, timeout_s=0))
    assert asyncio.run(engine.wait_drained("other", 1, timeout_s=0))
    _still_answers(served)
    assert asyncio.run(engine.wait_drained("m", 5, timeout_s=0))


def test_a_request_on_the_new_version_does_not_hold_up_draining_the_old_ones() -> None:
    cfg = _cfg("mixtral")
    state, _, _ = _build(cfg, version=2)
    engine, fleet = _held(state)

    async def main():
        running = asyncio.create_task(engine.forward("m", LAYER, _x(5, seed=280)))
        await fleet.until_called(1)
        results = (await engine.wait_drained("m", 2, timeout_s=0.05),
                   await engine.wait_drained("m", 3, timeout_s=0.05))
        fleet.release.set()
        await running
        return results + (await engine.wait_drained("m", 3, timeout_s=0.05),)

    assert asyncio.run(main()) == (True, False, True)


# ---- waiting for a lost expert to come back ------------------------------------------------


def _restored_state(state: ModelState, cfg: MoEConfig, version: int, gate: Gate | None = None,
                    ) -> ModelState:
    """`state` as the Controller publishes it after host 1 died: experts 1 and 4 (only on
    host 1 in `_replicas`) loaded again into free slots of host 0, host 1 dropped."""
    src = _source(cfg)
    h0 = state.hosts[0]
    for slot, e in ((5, 1), (6, 4)):
        h0.load_weights(slot=slot, layer=LAYER, expert=e, weights=src.expert(LAYER, e))
    reps = {e: [(0 if h == 0 else 1, s) for h, s in r if h != 1]
            for e, r in _replicas(list(range(E))).items()}
    reps[1], reps[4] = [(0, 5)], [(0, 6)]
    layer = replace(state.layers[LAYER], table=LayerTable.from_replicas(reps),
                    gate=gate or state.layers[LAYER].gate)
    return replace(state, version=version, layers={LAYER: layer},
                   hosts=[state.hosts[0], state.hosts[2]], host_ids=["h0", "h2"])


def test_rows_of_a_lost_expert_wait_for_the_version_that_restores_it_then_match() -> None:
    cfg = _cfg("mixtral")
    state, reference, gate = _build(cfg)
    fleet = _Fleet(gone={"h1"})
    engine = Engine(fleet, device="cpu", restore_wait_s=5.0)
    engine.install(state)
    x = _x(64, seed=240)
    ids = route(x, gate, cfg)[1]
    assert bool((ids == 1).any() and (ids == 4).any()), "some tokens must pick experts 1 and 4"

    async def main():
        running = asyncio.create_task(engine.forward("m", LAYER, x))
        while "h1" not in engine.dead_hosts:  # the request found host 1 gone and now waits
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not running.done(), "it waits instead of failing"
        # a waiting request holds up no drain: the Controller can retire version 1 meanwhile
        assert await engine.wait_drained("m", 2, timeout_s=0)
        engine.install(_restored_state(state, cfg, version=2))
        return await asyncio.wait_for(running, 5.0)

    y, version = asyncio.run(main())
    assert version == 1, "the version its gating ran on"
    torch.testing.assert_close(y, _expected(reference, gate, cfg, x))
    assert engine.in_flight_rows == {}
    assert asyncio.run(engine.wait_drained("m", 3, timeout_s=0)), "the request ended"


def test_rows_of_a_lost_expert_fail_after_restore_wait_or_when_it_was_removed() -> None:
    cfg = _cfg("mixtral")
    state, _, gate = _build(cfg)
    engine = Engine(_Fleet(gone={"h1"}), device="cpu", restore_wait_s=0.3)
    engine.install(state)
    x = _x(64, seed=241)
    t0 = asyncio.run(_timed(engine.forward("m", LAYER, x)))
    assert isinstance(t0[0], Unavailable)
    assert "no replica for expert(s) [1, 4] of layer 3 came back within 0.3s" in str(t0[0])
    assert 0.3 <= t0[1] < 2.0

    # a newer version whose gate row for expert 1 differs: not the expert the rows were meant for
    other = Gate(gate.weight.clone(), gate.expert_ids, gate.group_ids, gate.bias)
    other.weight[1] += 1.0

    async def main():
        running = asyncio.create_task(engine.forward("m", LAYER, x))
        await asyncio.sleep(0.05)
        engine.install(_restored_state(state, cfg, version=2, gate=other))
        return await asyncio.gather(running, return_exceptions=True)

    (err,) = asyncio.run(main())
    assert isinstance(err, Unavailable) and "removed or replaced" in str(err)


async def _timed(call) -> tuple[object, float]:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        result = await call
    except Exception as e:  # the error is the result under test
        result = e
    return result, loop.time() - t0


def test_an_older_version_never_replaces_a_newer_one() -> None:
    cfg = _cfg("olmoe")
    state, _, _ = _build(cfg, version=5)
    engine = Engine(_call_host, device="cpu")
    assert engine.install(state)
    assert not engine.install(replace(state, version=4))
    assert engine.state("m").version == 5
    assert engine.install(replace(state, version=5)), "the same version again is harmless"
