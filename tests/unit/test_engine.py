"""router/engine.py: gate -> plan -> hosts -> combine gives what the monolithic reference
layer gives, in every gating variant, and the engine's errors are the domain errors.

The hosts are plain `ExpertHost` objects reached through the same wire conversion the Ray
path uses (`to_wire` / `from_wire`), so only the Ray hop itself is left out. The reference is
`MoELayer` fed with `route(...)`, with the experts made by the same `RandomSource`.

# T = tokens, H = hidden, INTER = expert intermediate, E = routed experts
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from moefleet.cluster.spec import MoEConfig
from moefleet.experts.host import ExpertHost, from_wire, to_wire
from moefleet.experts.reference import MoELayer
from moefleet.experts.weights import RandomSource
from moefleet.router.dispatch import HostBatch, LayerTable
from moefleet.router.engine import Engine, LayerState, ModelState
from moefleet.router.errors import InvalidArgument, NotFound, Unavailable
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
    y, y_dtype = host.run(arr, dtype, b.slot_ids.tolist(), b.counts.tolist())
    return from_wire(y, y_dtype)


def _replicas(ids: list[int]) -> dict[int, list[tuple[int, int]]]:
    """Expert i (the i-th id) on host i % 3; the first and the last id get a second replica."""
    reps = {e: [(i % N_HOSTS, i // N_HOSTS)] for i, e in enumerate(ids)}
    reps[ids[0]].append((1, SLOTS - 1))
    reps[ids[-1]].append((2, SLOTS - 1))
    return reps


def _build(cfg: MoEConfig, ids: list[int] | None = None, version: int = 1, seed: int = 0,
           name: str = "m") -> tuple[ModelState, MoELayer, Gate]:
    """A model with one MoE layer on fresh hosts, and the reference layer it must match."""
    ids = list(range(E)) if ids is None else ids
    src = _source(cfg, seed)
    gw = src.gate(LAYER)
    groups = torch.arange(E) // (E // max(cfg.n_group, 1))
    gate = Gate(gw.weight, torch.tensor(ids), groups, gw.bias)
    hosts = [_host(i) for i in range(N_HOSTS)]
    reps = _replicas(ids)
    for row, e in enumerate(ids):
        for h, slot in reps[e]:
            hosts[h].load(slot, LAYER, e, src.expert(LAYER, row))
    shared = src.shared(LAYER)
    layer = LayerState(gate, LayerTable.from_replicas(reps), shared)
    state = ModelState(name, cfg, torch.float32, version, {LAYER: layer}, hosts)
    reference = MoELayer({e: src.expert(LAYER, row) for row, e in enumerate(ids)}, shared)
    return state, reference, gate


def _expected(reference: MoELayer, gate: Gate, cfg: MoEConfig, x: torch.Tensor) -> torch.Tensor:
    return reference(x, *route(x, gate, cfg))


def _x(t: int, seed: int) -> torch.Tensor:
    return torch.randn(t, H, generator=torch.Generator().manual_seed(seed))


# ---- parity with the reference ---------------------------------------------------------------


@pytest.mark.parametrize("t", [0, 1, 7, 64])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_matches_the_reference_layer(variant: str, t: int) -> None:
    cfg = _cfg(variant)
    state, reference, gate = _build(cfg)
    engine = Engine(_call_host, device="cpu")
    engine.install(state)
    x = _x(t, seed=t)
    y, version = asyncio.run(engine.forward("m", LAYER, x))
    assert version == 1 and y.dtype == x.dtype and y.shape == (t, H)
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
        asyncio.run(engine.forward(model, layer, x))
    assert err.value.code == code
    _still_answers(served)


def test_a_failing_host_gives_unavailable_and_the_engine_still_answers(served: tuple) -> None:
    engine = served[0]
    broken = Engine(_failing_call_host, device="cpu")
    broken.install(engine.state("m"))
    with pytest.raises(Unavailable, match="host h") as err:
        asyncio.run(broken.forward("m", LAYER, _x(7, seed=120)))
    assert err.value.code == "UNAVAILABLE"
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
