"""Elasticity on a local Ray cluster, with zero requests lost: replicas scaled up and down,
experts added and removed, a rebalance, hosts killed mid-load, the autoscaler following a
skewed load, and a Controller restart restored from its journal.

Every answer is checked against the reference of the routing version it reports.
"""

from __future__ import annotations

import functools
import threading
import time

import grpc
import pytest
import ray
import torch

from moefleet.client import Client
from moefleet.cluster import service
from moefleet.testing import VersionedReference
from tests.elastic import new_expert, run_load, wait_for, wrong_answers
from tests.specs import family_spec

pytestmark = pytest.mark.integration


def _replicas(c: Client, model: str) -> dict[tuple[int, int], list[str]]:
    (m,) = c.status(model).models
    return {(L.layer, e.expert): [r.host for r in e.replicas] for L in m.layers for e in L.experts}


@pytest.fixture
def running(ray_session, tmp_path):
    svcs = []

    def start(family: str, **overrides):
        spec = family_spec(family, **overrides)
        svc = service.start(spec, port=0, state_dir=str(tmp_path / "state"))
        svcs.append(svc)
        return spec, svc

    yield start
    for svc in svcs:
        svc.shutdown()


def test_scale_add_remove_rebalance_under_load_lose_nothing(running):
    spec, svc = running("deepseek_v3", hosts={"count": 2, "slots": 40})
    ref = VersionedReference(spec)
    stop = threading.Event()
    result, workers = run_load(svc.address, spec, stop, threads=4, max_requests=2400, max_s=150)
    with Client(svc.address, retries=0) as c:
        wait_for(lambda: len(result.answers) >= 100, 60)
        c.scale_expert(spec.name, layer=1, expert=5, replicas=2)
        c.scale_expert(spec.name, layer=3, replicas=2)  # every expert of layer 3
        added = []
        for i, layer in enumerate(spec.layers):
            new = new_expert(spec, seed=50 + i, scale=3.0)
            r = c.add_expert(spec.name, layer=layer, safetensors=new.data, group=i + 1)
            new.record(ref, r.routing_version, layer, r.expert, group=i + 1)
            added.append((layer, r.expert))
        wait_for(lambda: len(result.answers) >= 1000, 90)
        c.scale_expert(spec.name, layer=3, replicas=1)
        rb = c.rebalance(spec.name)
        for layer, e in added:
            r = c.remove_expert(spec.name, layer=layer, expert=e)
            ref.removed(r.routing_version, layer, e)
        c.scale_expert(spec.name, layer=1, expert=5, replicas=1)
        for w in workers:
            w.join(timeout=180)
        stop.set()
        final = _replicas(c, spec.name)
        (status,) = c.status(spec.name).models
    assert result.errors == []
    assert len(result.answers) >= 2000
    assert wrong_answers(result, ref) == []
    versions = {v for *_, v in result.answers}
    assert len(versions) >= 5, f"the load should span many routing versions, saw {sorted(versions)}"
    assert rb.moves <= rb.moves_from_scratch
    assert set(final) == {(L, e) for L in spec.layers for e in range(spec.moe.n_routed_experts)}
    for layer in status.layers:  # every expert serves with the count the Controller aims for
        for e in layer.experts:
            assert len(e.replicas) == e.target_replicas >= 1
            assert len({r.host for r in e.replicas}) == len(e.replicas)


@pytest.mark.slow  # ~15 s each
@pytest.mark.parametrize("transport", ["grpc", "ray"])
def test_killed_host_loses_nothing_when_every_expert_has_two_replicas(running, transport):
    spec, svc = running("mixtral", hosts={"count": 3, "slots": 12}, router={"transport": transport})
    ref = VersionedReference(spec)
    with Client(svc.address, retries=0) as c:
        for layer in spec.layers:
            c.scale_expert(spec.name, layer=layer, replicas=2)
        before = _replicas(c, spec.name)
        stop = threading.Event()
        result, workers = run_load(svc.address, spec, stop, threads=4, max_requests=800, max_s=90)
        wait_for(lambda: len(result.answers) >= 150, 60)
        victim = before[(spec.layers[0], 0)][0]
        ray.kill(svc.hosts[victim], no_restart=True)
        for w in workers:
            w.join(timeout=120)
        restored = wait_for(lambda: (lambda r: r if all(
            len(h) == 2 and victim not in h for h in r.values()) else None)(_replicas(c, spec.name)), 60)
    assert result.errors == []
    assert wrong_answers(result, ref) == []
    assert restored, "the Controller brings every expert back to 2 replicas on live hosts"


def test_rows_of_a_lost_last_replica_wait_for_its_restore_then_are_correct(running):
    spec, svc = running("olmoe", hosts={"count": 2, "slots": 32})
    ref = VersionedReference(spec)
    x = torch.randn(256, spec.moe.hidden_size, generator=torch.Generator().manual_seed(5))
    with Client(svc.address, retries=0) as c:
        victim = _replicas(c, spec.name)[(1, 0)][0]
        ray.kill(svc.hosts[victim], no_restart=True)
        t0 = time.monotonic()
        y, version = c.infer_with_version(spec.name, 1, x, timeout_s=10)  # no retry: one call
        waited = time.monotonic() - t0
        restored = _replicas(c, spec.name)
    assert waited < spec.router.restore_wait_s
    assert all(victim not in hosts for hosts in restored.values())
    torch.testing.assert_close(y, ref(version, 1, x))


def test_autoscaler_follows_a_skewed_load_up_and_back_down(running):
    policy = {"enabled": True, "target_tokens_per_s": 150.0, "max_replicas": 3,
              "upscale_delay_s": 0.0, "downscale_delay_s": 2.0, "smoothing": 1.0, "period_s": 0.5}
    spec, svc = running("mixtral", hosts={"count": 2, "slots": 16}, autoscaling=policy)
    ref = VersionedReference(spec)
    hot = ref.base.gates[1].weight[6]  # tokens near expert 6's gate row pick expert 6

    def skewed(t: int, h: int, g: torch.Generator) -> torch.Tensor:
        return 4.0 * hot / hot.norm() + 0.3 * torch.randn(t, h, generator=g)

    stop = threading.Event()
    result, workers = run_load(svc.address, spec, stop, threads=4, max_requests=6000, max_s=60,
                               make_x=skewed)
    with Client(svc.address, retries=0) as c:
        up = wait_for(lambda: len(_replicas(c, spec.name)[(1, 6)]) >= 2, 45)
        stop.set()
        for w in workers:
            w.join(timeout=60)
        down = wait_for(lambda: len(_replicas(c, spec.name)[(1, 6)]) == 1, 45)
    rows = torch.cat([route_ids(ref, x) for layer, x, *_ in result.answers if layer == 1])
    assert (rows == 6).float().mean() >= 0.5 / spec.moe.num_experts_per_tok
    assert up, "the hot expert got more replicas"
    assert down, "and went back to one when the load ended"
    assert result.errors == []
    assert wrong_answers(result, ref) == []


def route_ids(ref: VersionedReference, x: torch.Tensor) -> torch.Tensor:
    from moefleet.router.gating import route

    return route(x, ref.base.gates[1], ref.spec.moe)[1].reshape(-1)


def test_restarted_controller_restores_its_registry_from_the_journal(running):
    spec, svc = running("qwen2_moe")
    ref = VersionedReference(spec)
    x = torch.randn(32, spec.moe.hidden_size, generator=torch.Generator().manual_seed(9))
    with Client(svc.address, retries=2) as c:
        c.scale_expert(spec.name, layer=3, expert=4, replicas=2)
        new = new_expert(spec, seed=77)
        r = c.add_expert(spec.name, layer=3, safetensors=new.data)
        new.record(ref, r.routing_version, 3, r.expert)
        before = _replicas(c, spec.name)
        ray.kill(svc.controller, no_restart=False)  # Ray restarts it; it reads its journal

        def restored():  # the old instance may still answer before the kill lands
            y, version = c.infer_with_version(spec.name, 3, x)
            return (y, version) if version > r.routing_version else None
        y, version = wait_for(restored, 60)  # the restore publishes a new version
        assert _replicas(c, spec.name) == before
        torch.testing.assert_close(y, ref(version, 3, x))
        c.scale_expert(spec.name, layer=3, expert=4, replicas=1)  # and it still makes changes
        assert len(_replicas(c, spec.name)[(3, 4)]) == 1


def _status_or_none(c: Client, model: str):
    try:
        return _replicas(c, model)
    except grpc.RpcError:
        return None


def test_bad_changes_get_clear_statuses_and_the_service_still_answers(running):
    spec, svc = running("deepseek_v2")
    ref = VersionedReference(spec)
    x = torch.randn(16, spec.moe.hidden_size, generator=torch.Generator().manual_seed(2))
    new = new_expert(spec, seed=3)
    with Client(svc.address, retries=0) as c:
        add = functools.partial(c.add_expert, spec.name)
        cases = [
            (lambda: add(layer=1, safetensors=new.data), grpc.StatusCode.INVALID_ARGUMENT),  # no group
            (lambda: add(layer=1, safetensors=new.data, group=9), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: add(layer=1, safetensors=b"not a file", group=0), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: add(layer=1, safetensors=new.data, expert=3, group=0), grpc.StatusCode.ALREADY_EXISTS),
            (lambda: add(layer=2, safetensors=new.data, group=0), grpc.StatusCode.NOT_FOUND),
            (lambda: c.remove_expert(spec.name, layer=1, expert=99), grpc.StatusCode.NOT_FOUND),
            (lambda: c.scale_expert(spec.name, layer=1, expert=1, replicas=0),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: c.scale_expert(spec.name, layer=1, expert=1, replicas=99),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: c.scale_expert(spec.name, layer=1, replicas=100_000), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: c.scale_expert("nope", layer=1, replicas=2), grpc.StatusCode.NOT_FOUND),
            (lambda: c.scale_expert(spec.name, layer=2, replicas=2), grpc.StatusCode.NOT_FOUND),
            (lambda: add(layer=1, safetensors=new.data, expert=2**40, group=0),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: c.rebalance(spec.name, replicas=1), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: c.rebalance(spec.name, replicas=-1), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: c.set_autoscaling(spec.name, enabled=True, target_tokens_per_s=float("inf")),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: c.set_autoscaling(spec.name, enabled=True, max_replicas=1000),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: c.status("m" * (1 << 20)), grpc.StatusCode.NOT_FOUND),
        ]
        version = c.status(spec.name).models[0].routing_version
        for call, code in cases:
            with pytest.raises(grpc.RpcError) as err:
                call()
            details = err.value.details()
            assert err.value.code() == code, details
            # the domain message alone: no Ray traceback, colours or echo of a long name
            assert len(details) < 500, details
            assert not any(s in details for s in ("ray::", "Traceback", "\x1b")), details
        (m,) = c.status(spec.name).models
        assert m.routing_version == version and not m.autoscaling.enabled  # nothing changed
        # group-limited (4 groups of 4, keep 2, top-3): groups shrink unequally until the two
        # smallest would hold fewer than 3 experts
        removed = []
        for e in (5, 6, 7, 9, 10):
            removed.append((c.remove_expert(spec.name, layer=1, expert=e).routing_version, e))
        with pytest.raises(grpc.RpcError) as err:
            c.remove_expert(spec.name, layer=1, expert=11)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        y, version = c.infer_with_version(spec.name, 1, x)
    for v, e in removed:
        ref.removed(v, 1, e)
    torch.testing.assert_close(y, ref(version, 1, x))
