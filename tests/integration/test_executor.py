"""cluster/executor.py with fake hosts and routers (no Ray cluster is started): the order of effects DESIGN.md
asks for (load → publish → drain → free), migrations through full hosts, and that an expert
that keeps replicas is never left with none between two versions; a serving model loads in
rounds of at most hosts.loads_per_host replicas per host. A gate change given as data
(`Admit`, `Forget`) lands in the first version published, and the executor journals its own
part beside the Controller's.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from moefleet.cluster.executor import Admit, Executor, Forget
from moefleet.cluster.journal import Journal
from moefleet.cluster.placement import Move
from moefleet.cluster.registry import HostRecord, ModelRecord
from tests.specs import family_spec

pytestmark = pytest.mark.integration  # no cluster, but the Executor imports Ray


class _Method:
    def __init__(self, log: list, name: str, result=None):
        self._log, self._name, self._result = log, name, result

    def options(self, **_options):
        return self

    def remote(self, *args, **kwargs):
        self._log.append((self._name, *args, *([kwargs] if kwargs else [])))
        return _Done(self._result)


class _Failing:
    """A result that makes the call fail when awaited."""

    def __init__(self, error: Exception):
        self.error = error


class _Done:
    """Awaitable like an ObjectRef, and harmless when never awaited (fire and forget)."""

    def __init__(self, result):
        self._result = result

    def __await__(self):
        if isinstance(self._result, _Failing):
            raise self._result.error
        return self._result
        yield  # a generator: awaiting it returns at once


class _Actor:
    """Records each call as (name, *args[, kwargs]) into a log shared by every fake."""

    def __init__(self, log: list, name: str, **results):
        self._log, self._name, self._results = log, name, results

    def __getattr__(self, method: str) -> _Method:
        return _Method(self._log, f"{self._name}.{method}", self._results.get(method))


class _Metrics:
    def record_model(self, m) -> None:
        pass


def _setup(slots: dict[str, int], replicas: dict[tuple[int, int], list[tuple[str, int]]]):
    log: list = []
    spec = family_spec("mixtral")
    model = ModelRecord.from_spec(spec)
    model.replicas = {k: list(v) for k, v in replicas.items()}
    hosts = {h: HostRecord(h, spec.name, _Actor(log, h), {"slots_total": n}) for h, n in slots.items()}
    for k, reps in replicas.items():
        for h, s in reps:
            hosts[h].slots[s] = k
    ex = Executor(_Metrics())
    for rec in hosts.values():
        ex.fleet.add_host(rec)
    ex.fleet.add_router("r0", _Actor(log, "router", wait_drained=True), "10.0.0.1:50051")
    return ex, model, hosts, log


def _versions(log: list) -> list[dict]:
    """The replicas of each installed version, as {(layer, expert): [(host index, slot)]}."""
    return [{L: {e: list(reps) for e, reps in lr.replicas.items()}
             for L, lr in args[0]["state"].layers.items()}
            for name, *args in log if name == "router.install"]


def test_adds_are_loaded_before_the_publish_and_removes_freed_after_the_drain():
    ex, m, hosts, log = _setup({"A": 4, "B": 4}, {(1, 0): [("A", 0)], (1, 1): [("B", 0)]})
    moves = [Move("add", (1, 0), "B"), Move("remove", (1, 1), "B"), Move("add", (1, 1), "A")]
    added, removed, first = asyncio.run(ex.execute(m, moves))
    names = [entry[0] for entry in log]
    assert names.index("B.load_weights_from") < names.index("router.install")
    assert names.index("router.install") < names.index("router.wait_drained") < names.index("B.free")
    assert (added, removed, first) == (2, 1, 1)
    assert sorted(m.replicas[(1, 0)]) == [("A", 0), ("B", 1)] and m.replicas[(1, 1)] == [("A", 1)]
    assert hosts["B"].slots == {1: (1, 0)}


def test_more_adds_than_free_slots_wait_for_the_removes_of_the_same_plan():
    # host A has 2 slots: expert 0 leaves it, experts 1 and 2 arrive (the bench's failing case)
    ex, m, hosts, log = _setup({"A": 2, "B": 4},
                               {(1, 0): [("A", 0), ("B", 0)], (1, 1): [("B", 1)], (1, 2): [("B", 2)]})
    moves = [Move("remove", (1, 0), "A"), Move("add", (1, 1), "A"), Move("add", (1, 2), "A")]
    added, removed, _ = asyncio.run(ex.execute(m, moves))
    assert (added, removed) == (2, 1)
    assert set(hosts["A"].slots.values()) == {(1, 1), (1, 2)}
    assert len(_versions(log)) == 2  # a second round after the first freed A's slot


def test_a_migrating_expert_keeps_a_replica_in_every_version():
    # A is full, B has one free slot; expert 0 moves A -> B and expert 2 moves B -> A: 2 waits
    # for the slot 0 leaves, and keeps its old replica until then
    ex, m, hosts, log = _setup({"A": 1, "B": 3},
                               {(1, 0): [("A", 0)], (1, 1): [("B", 0)], (1, 2): [("B", 1)]})
    moves = [Move("remove", (1, 0), "A"), Move("add", (1, 0), "B"),
             Move("remove", (1, 2), "B"), Move("add", (1, 2), "A")]
    asyncio.run(ex.execute(m, moves))
    for version in _versions(log):
        assert {0, 1, 2} <= {e for per_layer in version.values() for e in per_layer}
    assert m.replicas[(1, 0)][0][0] == "B" and m.replicas[(1, 2)][0][0] == "A"


def test_removing_an_expert_entirely_is_one_publish_then_free():
    ex, m, hosts, log = _setup({"A": 4}, {(1, 0): [("A", 0)], (1, 1): [("A", 1)]})
    del m.experts[1][1]
    _, removed, first = asyncio.run(ex.execute(m, [Move("remove", (1, 1), "A")]))
    assert removed == 1 and first == 1 and len(_versions(log)) == 1
    assert 1 not in _versions(log)[0][1] and hosts["A"].slots == {0: (1, 0)}


def test_a_swap_between_full_hosts_still_completes():
    # no free slot anywhere: the only way through leaves the two experts briefly without a
    # replica (requests touching them get UNAVAILABLE, never a wrong answer)
    ex, m, hosts, log = _setup({"A": 1, "B": 1}, {(1, 0): [("A", 0)], (1, 2): [("B", 0)]})
    moves = [Move("remove", (1, 0), "A"), Move("add", (1, 0), "B"),
             Move("remove", (1, 2), "B"), Move("add", (1, 2), "A")]
    added, removed, _ = asyncio.run(ex.execute(m, moves))
    assert (added, removed) == (2, 2)
    assert m.replicas == {(1, 0): [("B", 0)], (1, 2): [("A", 0)]}


def test_a_failed_load_gives_back_every_slot_of_its_batch_and_publishes_nothing():
    ex, m, hosts, log = _setup({"A": 4, "B": 4}, {(1, 0): [("A", 0)]})
    hosts["B"].handle = _Actor(log, "B", load_weights_from=_Failing(ValueError("bad weights")))
    moves = [Move("add", (1, 1), "A"), Move("add", (1, 2), "B")]
    with pytest.raises(ValueError, match="bad weights"):
        asyncio.run(ex.execute(m, moves))
    assert hosts["A"].slots == {0: (1, 0)} and hosts["B"].slots == {}
    assert ("A.free", {"slot": 1}) in log and _versions(log) == []
    assert m.replicas == {(1, 0): [("A", 0)]}


@pytest.mark.parametrize("version, b_serves, rounds", [(0, True, 1), (3, True, 3), (3, False, 1)])
def test_a_serving_host_loads_one_replica_per_published_round(version, b_serves, rounds):
    # bring-up (version 0) loads everything at once; once serving, hosts.loads_per_host (1)
    # per round on a host that serves; a host that serves nothing yet (a spare) at once
    served = {(1, e): [("A", e)] for e in range(3)} | ({(1, 3): [("B", 3)]} if b_serves else {})
    ex, m, hosts, log = _setup({"A": 4, "B": 4}, served)
    m.version = version
    asyncio.run(ex.execute(m, [Move("add", (1, e), "B") for e in range(3)]))
    calls = [name for name, *_ in log if name in ("B.load_weights_from", "router.install")]
    assert calls == ["B.load_weights_from"] * 3 + ["router.install"] if rounds == 1 else (
        ["B.load_weights_from", "router.install"] * 3)
    assert sorted(m.replicas[(1, 2)]) == [("A", 2), ("B", 2)] and len(_versions(log)) == rounds


def _gate_ids(log: list) -> list[list[int]]:
    """The expert ids of layer 1's gate in each installed version."""
    return [args[0]["state"].layers[1].gate.expert_ids.tolist() for name, *args in log
            if name == "router.install"]


def test_an_admitted_expert_loads_its_own_weights_and_joins_the_gate_with_its_first_replica():
    ex, m, hosts, log = _setup({"A": 4}, {(1, 0): [("A", 0)]})
    new = replace(m.experts[1][0], group=0)
    added, _, first = asyncio.run(ex.execute(m, [Move("add", (1, 8), "A")],
                                             Admit((1, 8), new, "weights-ref")))
    assert ("A.load_weights", {"slot": 1, "layer": 1, "expert": 8, "weights": "weights-ref"}) in log
    assert (added, first) == (1, 1) and m.experts[1][8] is new
    assert 8 in _gate_ids(log)[0] and _versions(log)[0][1][8] == [(0, 1)]


def test_a_forgotten_expert_leaves_the_gate_before_its_slots_are_freed_and_its_weights_go():
    ex, m, hosts, log = _setup({"A": 4}, {(1, 0): [("A", 0)]})
    asyncio.run(ex.execute(m, [Move("add", (1, 8), "A")], Admit((1, 8), m.experts[1][0], "ref")))
    m.target[(1, 8)], m.tokens_per_s[(1, 8)] = 1, 5.0
    log.clear()
    asyncio.run(ex.execute(m, [Move("remove", (1, 8), "A")], Forget((1, 8))))
    names = [entry[0] for entry in log]
    assert 8 not in _gate_ids(log)[0] and names.index("router.install") < names.index("A.free")
    assert 8 not in m.experts[1] and (1, 8) not in m.target and (1, 8) not in m.tokens_per_s
    m.experts[1][8] = m.experts[1][0]  # the same id again, with no weights of its own left
    asyncio.run(ex.execute(m, [Move("add", (1, 8), "A")]))
    assert [n for n, *_ in log if n.startswith("A.load")][-1] == "A.load_weights_from"


def test_an_admission_whose_load_fails_changes_neither_gate_nor_replicas():
    ex, m, hosts, log = _setup({"A": 4}, {(1, 0): [("A", 0)]})
    hosts["A"].handle = _Actor(log, "A", load_weights=_Failing(ValueError("bad weights")))
    with pytest.raises(ValueError, match="bad weights"):
        asyncio.run(ex.execute(m, [Move("add", (1, 8), "A")], Admit((1, 8), m.experts[1][0], "ref")))
    assert 8 not in m.experts[1] and _versions(log) == [] and hosts["A"].slots == {0: (1, 0)}


def test_the_executor_journals_its_part_and_the_model_it_changed_beside_the_controllers(tmp_path):
    log: list = []
    spec = family_spec("mixtral")
    m = ModelRecord.from_spec(spec)
    journal = Journal(tmp_path)
    journal.update(models={"other": {"kept": True}}, policy={"other": {"pending": []}})
    ex = Executor(_Metrics(), journal)
    ex.fleet.add_host(HostRecord("A", spec.name, _Actor(log, "A"), {"id": "A", "slots_total": 4}))
    ex.fleet.add_router("r0", _Actor(log, "router", wait_drained=True), "10.0.0.1:50051")
    asyncio.run(ex.execute(m, [Move("add", (1, 0), "A")]))
    state = Journal(tmp_path).load()
    assert state["models"]["other"] == {"kept": True} and state["policy"] == {"other": {"pending": []}}
    assert state["models"][spec.name]["version"] == 1
    assert state["models"][spec.name]["replicas"] == [[1, 0, "A", 0]]
    assert state["hosts"] == [{"id": "A", "model": spec.name, "info": {"id": "A", "slots_total": 4},
                               "slots": [[0, 1, 0]]}]
    assert state["routers"] == {"r0": "10.0.0.1:50051"}
    assert state["dataplane_secret"] == ex.fleet.dataplane_secret
