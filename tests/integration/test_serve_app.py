"""moefleet as a Ray Serve application (deploy/serve/app.py) on the session's local Ray: Serve
reports it RUNNING and HEALTHY, moefleet's own gRPC port answers like the reference, a replica
Serve replaces adopts the running service, and deleting the application stops moefleet."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import grpc
import pytest
import ray
import torch
from ray import serve

from deploy.serve.app import build
from moefleet.client import Client
from moefleet.cluster.service import CONTROLLER_NAME, NAMESPACE, ROUTER_NAME
from moefleet.testing import Reference
from tests.specs import family_spec

pytestmark = pytest.mark.integration

APP = "moefleet-serve-test"
DEPLOYMENT = "MoefleetService"


@pytest.fixture(scope="module")
def served(ray_session):
    spec = family_spec("deepseek_v3")
    http_port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})  # nothing on 0.0.0.0
    try:
        args = {"spec": spec.to_dict(), "port": 0, "host": "127.0.0.1"}
        handle = serve.run(build(args), name=APP, route_prefix="/moefleet")
        yield spec, handle, http_port
    finally:
        serve.shutdown()  # deletes the application, if a test has not: moefleet stops with it


def test_serve_reports_the_application_running_and_the_replica_healthy(served):
    app = serve.status().applications[APP]
    assert app.status == "RUNNING"
    assert app.deployments[DEPLOYMENT].status == "HEALTHY"


def test_moefleet_grpc_port_answers_like_the_reference(served):
    spec, handle, _ = served
    address = handle.address.remote().result(timeout_s=10)
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    ref, g = Reference(spec), torch.Generator().manual_seed(5)
    with Client(address) as c:
        for layer in spec.layers:
            x = torch.randn(9, spec.moe.hidden_size, generator=g)
            torch.testing.assert_close(c.infer(spec.name, layer, x), ref(layer, x))


def test_http_route_answers_moefleet_status_as_json(served):
    spec, handle, http_port = served
    body = _get_json(f"http://127.0.0.1:{http_port}/moefleet")
    assert body["address"] == handle.address.remote().result(timeout_s=10)
    assert [m["name"] for m in body["models"]] == [spec.name]
    assert len(body["hosts"]) == spec.hosts.count


def test_replaced_replica_adopts_the_running_service(served):
    spec, handle, _ = served
    address = handle.address.remote().result(timeout_s=10)
    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    (old,) = _replica_names()
    ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)  # no __del__: a crash

    deadline = time.monotonic() + 45
    while not (_replica_names() - {old} and _deployment_status() == "HEALTHY"):
        assert time.monotonic() < deadline, "Serve did not bring up a new, healthy replica"
        time.sleep(0.5)
    assert _call_until_answered(handle) == address  # the same gRPC server, adopted
    assert ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)._actor_id == controller._actor_id
    x = torch.randn(4, spec.moe.hidden_size, generator=torch.Generator().manual_seed(6))
    with Client(address) as c:
        torch.testing.assert_close(c.infer(spec.name, spec.layers[0], x), Reference(spec)(spec.layers[0], x))


def test_redeploying_with_another_spec_replaces_the_service(served):
    spec, handle, _ = served
    old_controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)._actor_id
    new = family_spec("mixtral", weights={"random": {"seed": 8}})
    handle = serve.run(build({"spec": new.to_dict(), "port": 0, "host": "127.0.0.1"}),
                       name=APP, route_prefix="/moefleet")

    assert ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)._actor_id != old_controller
    x = torch.randn(6, new.moe.hidden_size, generator=torch.Generator().manual_seed(7))
    with Client(_call_until_answered(handle)) as c:
        torch.testing.assert_close(c.infer(new.name, new.layers[0], x), Reference(new)(new.layers[0], x))
        assert [m.name for m in c.status().models] == [new.name]


def test_deleting_the_application_stops_moefleet(served):
    _, handle, _ = served
    address = handle.address.remote().result(timeout_s=10)
    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    hosts = [h["id"] for h in ray.get(controller.status.remote())["hosts"]]

    serve.delete(APP)

    names = [CONTROLLER_NAME, ROUTER_NAME.format(0), *hosts]
    deadline = time.monotonic() + 15
    while left := [n for n in names if _named(n)]:
        assert time.monotonic() < deadline, f"still running after serve.delete: {left}"
        time.sleep(0.2)
    with Client(address, retries=0) as c, pytest.raises(grpc.RpcError) as err:
        c.ready(timeout_s=1)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# ---- helpers ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:  # the HTTP proxy may come up a moment after the application
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _replica_names() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}#")}


def _deployment_status() -> str | None:
    app = serve.status().applications.get(APP)
    return app.deployments[DEPLOYMENT].status if app and DEPLOYMENT in app.deployments else None


def _call_until_answered(handle, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:  # the handle may still pick the dead replica once
        try:
            return handle.address.remote().result(timeout_s=5)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _named(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True
