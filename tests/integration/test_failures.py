"""A failed expert host never turns into a wrong answer: requests touching it get UNAVAILABLE."""

from __future__ import annotations

import grpc
import pytest
import ray
import torch

from moefleet.client import Client
from moefleet.cluster import service
from moefleet.cluster.model import Reference
from moefleet.router.errors import Unavailable
from tests.specs import family_spec

pytestmark = pytest.mark.integration


def test_killed_host_gives_unavailable_never_a_wrong_tensor(ray_session):
    spec = family_spec("mixtral")
    svc = service.start(spec, port=0)
    try:
        ref = Reference(spec)
        x = torch.randn(256, spec.moe.hidden_size, generator=torch.Generator().manual_seed(0))
        with Client(svc.address, retries=0) as c:
            torch.testing.assert_close(c.infer(spec.name, 1, x), ref(1, x))
            ray.kill(svc.hosts[0], no_restart=True)
            with pytest.raises(grpc.RpcError) as err:
                c.infer(spec.name, 1, x)  # 256 tokens × top-2 touch every expert
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Unavailable):
            ray.get(svc.routers[0].submit.remote(spec.name, 3, x))
    finally:
        svc.shutdown()


def test_second_service_on_the_same_cluster_is_refused(ray_session):
    spec = family_spec("olmoe")
    svc = service.start(spec, port=0)
    try:
        with pytest.raises(RuntimeError, match="already runs"):
            service.start(spec, port=0)
    finally:
        svc.shutdown()
