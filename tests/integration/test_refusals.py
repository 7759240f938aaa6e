"""Changes the cluster cannot satisfy, on the local Ray (which cannot add nodes): a scale that
needs another host is refused at once (not after hosts.start_timeout_s) and keeps the old
target; a rebalance that cannot place every replica changes nothing unless allow_partial, and
then says how many it placed; max_moves=1 moves nothing and says what it cut.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from moefleet.client import Client
from moefleet.cluster import service
from tests.elastic import wait_for
from tests.specs import family_spec

pytestmark = pytest.mark.integration


def _model(c: Client, name: str):
    (m,) = c.status(name).models
    return m


def test_refused_scale_and_short_rebalance_answer_at_once_and_change_nothing(ray_session, tmp_path):
    # 2 hosts of 1.5 CPUs fill the session's 4 (with the router): no room for a third host,
    # and their 16 slots hold mixtral's 2 layers × 8 experts exactly.
    spec = family_spec("mixtral", hosts={"count": 2, "num_cpus": 1.5, "slots": 8})
    svc = service.start(spec, port=0, state_dir=str(tmp_path / "state"))
    try:
        with Client(svc.address, retries=0) as c:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                c.scale_expert(spec.name, layer=1, expert=0, replicas=3)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "cannot add nodes" in e.value.details() and "stay as they were" in e.value.details()
            assert time.monotonic() - t0 < 20  # spec.hosts.start_timeout_s is 60
            m = _model(c, spec.name)
            (e0,) = [x for x in m.layers[0].experts if x.expert == 0]
            assert (e0.target_replicas, len(e0.replicas)) == (1, 1)

            g = torch.Generator().manual_seed(0)
            for _ in range(10):  # load for the Controller to measure
                c.infer(spec.name, 1, torch.randn(16, spec.moe.hidden_size, generator=g))
            wait_for(lambda: any(x.tokens_per_s > 0 for x in _model(c, spec.name).layers[0].experts), 30)
            version = _model(c, spec.name).routing_version
            with pytest.raises(grpc.RpcError) as e:
                c.rebalance(spec.name, replicas=24)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "placed 16 of 24 replicas" in e.value.details(), e.value.details()
            assert _model(c, spec.name).routing_version == version  # nothing changed

            r = c.rebalance(spec.name, replicas=24, allow_partial=True)
            assert (r.replicas_requested, r.replicas_placed) == (24, 16)
            r = c.rebalance(spec.name, max_moves=1)  # a move is a remove and an add: none fits
            assert r.moves == 0 and r.host_imbalance_after == r.host_imbalance_before
            assert r.moves_uncut >= r.moves
    finally:
        svc.shutdown()
