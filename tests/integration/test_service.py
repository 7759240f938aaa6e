"""Host and router actors on a local Ray cluster agree with the in-process reference layer,
for every gating family (on the default transport, auto), and for one family on each of the
router's transports to its hosts (Ray calls, gRPC data plane), through the router's gRPC port."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
import torch

from moefleet.client import Client
from moefleet.cluster import service
from moefleet.experts.dataplane import RUN_METHOD, SECRET_KEY, encode_request
from moefleet.experts.host import ExpertHost
from moefleet.experts.weights import RandomSource
from moefleet.testing import Reference
from tests.specs import FAMILIES, family_spec

pytestmark = pytest.mark.integration


_RUNS = [(f, "auto") for f in sorted(FAMILIES)] + [("mixtral", "ray"), ("mixtral", "grpc")]


@pytest.fixture(scope="module", params=_RUNS, ids=[f"{f}-{t}" for f, t in _RUNS])
def running(request, ray_session):
    family, transport = request.param
    spec = family_spec(family, router={"transport": transport})
    svc = service.start(spec, port=0)
    yield spec, svc, Reference(spec)
    svc.shutdown()


@pytest.mark.parametrize("tokens", [1, 7, 64, 1000])
def test_router_matches_reference(running, tokens):
    spec, svc, ref = running
    g = torch.Generator().manual_seed(tokens)
    with Client(svc.address) as c:
        for layer in spec.layers:
            x = torch.randn(tokens, spec.moe.hidden_size, generator=g)
            y, version = c.infer_with_version(spec.name, layer, x)
            torch.testing.assert_close(y, ref(layer, x))
            assert version == 1


def test_grpc_answer_matches_reference_and_reports_version(running):
    spec, svc, ref = running
    x = torch.randn(33, spec.moe.hidden_size, generator=torch.Generator().manual_seed(3))
    with Client(svc.address) as c:
        y, version = c.infer_with_version(spec.name, spec.layers[-1], x)
    torch.testing.assert_close(y, ref(spec.layers[-1], x))
    assert version == 1


def test_concurrent_requests_are_merged_and_each_gets_its_own_rows(running):
    spec, svc, ref = running
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(t, spec.moe.hidden_size, generator=g) for t in (5, 1, 17, 3, 40, 2)]
    with Client(svc.address) as c, ThreadPoolExecutor(len(xs)) as pool:
        ys = list(pool.map(lambda x: c.infer(spec.name, spec.layers[0], x), xs))
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(y, ref(spec.layers[0], x))


def test_hosts_hold_every_expert_once(running):
    spec, svc, _ = running
    status = ray.get(svc.controller.status.remote(model=spec.name))
    (model,) = status["models"]
    for layer in model["layers"]:
        assert [e["expert"] for e in layer["experts"]] == list(range(spec.moe.n_routed_experts))
        assert all(len(e["replicas"]) == 1 for e in layer["experts"])
    used = sum(h["slots_used"] for h in status["hosts"])
    assert used == len(spec.layers) * spec.moe.n_routed_experts


def test_hosts_serve_the_data_plane_on_the_node_ip_and_refuse_calls_without_the_secret(running):
    spec, svc, _ = running
    for handle in svc.hosts.values():
        info = ray.get(handle.info.remote())
        ip, port = info["dataplane"].rsplit(":", 1)
        assert ip == info["node_ip"] != "0.0.0.0" and int(port) > 0
        data = encode_request(torch.ones(1, spec.moe.hidden_size), torch.tensor([0]), torch.tensor([1]))
        with grpc.insecure_channel(info["dataplane"]) as ch, pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(RUN_METHOD)(data, metadata=((SECRET_KEY, "guess"),), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_host_loads_weights_through_the_object_store(ray_session):
    src = RandomSource(seed=3, hidden_size=32, intermediate_size=16, n_routed_experts=4)
    host = ray.remote(ExpertHost).options(num_cpus=0.25).remote("h", 4, 1)
    w = ray.put(src.expert(0, 2))
    ray.get(host.load_weights.remote(slot=1, layer=0, expert=2, weights=w))
    x = torch.randn(5, 32)
    from moefleet.experts.host import from_wire, to_wire

    arr, dtype = to_wire(x)
    y = from_wire(*ray.get(host.run.remote(x=arr, dtype=dtype, slot_ids=[1], counts=[5])))
    torch.testing.assert_close(y, src.expert(0, 2)(x))
    ray.kill(host)
