"""cluster/admin.py: with an admin token, a call without it is UNAUTHENTICATED and one with the
wrong token PERMISSION_DENIED, while the right `Bearer` token (or no token configured) lets it
through; the status converts to proto and back without losing a value or a type; Rebalance
passes its balance-vs-moves knob only when set and answers the shortfall and what the knob cut.
"""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace
from typing import Any

import pytest

from moefleet.cluster.admin import AdminServicer, status_from_proto, status_to_proto
from moefleet.core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from moefleet.protos import admin_pb2 as pb

pytestmark = pytest.mark.unit

TOKEN = os.urandom(12).hex()


class _Context:
    """What the servicer reads of a grpc.aio ServicerContext: the call's metadata."""

    def __init__(self, *metadata: tuple[str, str]):
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


class _Controller:
    """Stands in for the Controller actor handle: `status.remote(model=...)` is awaitable."""

    def __init__(self, status: dict[str, Any]):
        self.calls: list[str] = []

        async def remote(*, model: str) -> dict[str, Any]:
            self.calls.append(model)
            return status

        self.status = SimpleNamespace(remote=remote)


def _status() -> dict[str, Any]:
    """Shaped like `Controller.status()`: two layers, replicas on two hosts, uneven figures."""
    def expert(e: int, group: int, tokens_per_s: float, reps: list[tuple[str, int]]) -> dict[str, Any]:
        return {"expert": e, "group": group, "tokens_per_s": tokens_per_s, "target_replicas": len(reps),
                "replicas": [{"host": h, "slot": s} for h, s in reps]}

    return {
        "models": [{
            "name": "tiny", "routing_version": 2**40 + 3, "dtype": "bfloat16", "hidden_size": 7168,
            "layers": [
                {"layer": 1, "experts": [expert(0, 0, 1234.5625, [("tiny-host-0", 0), ("tiny-host-1", 5)]),
                                         expert(3, 1, 0.0, [])]},
                {"layer": 3, "experts": [expert(17, 2, 0.1, [("tiny-host-1", 15)])]},
            ],
            "autoscaling": {"enabled": True, "target_tokens_per_s": 2500.5, "min_replicas": 1,
                            "max_replicas": 6, "upscale_delay_s": 2.0, "downscale_delay_s": 30.25},
            "latency_p50_s": 0.0123, "latency_p99_s": 0.75, "requests_per_s": 41.5,
        }],
        "hosts": [
            {"id": "tiny-host-0", "node_id": "ab" * 28, "node_ip": "10.0.0.1", "device": "cpu",
             "slots_total": 16, "slots_used": 1},
            {"id": "tiny-host-1", "node_id": "cd" * 28, "node_ip": "10.0.0.2", "device": "cuda:0",
             "slots_total": 64, "slots_used": 2},
        ],
        "routers": [{"name": "moefleet-router-0", "address": "10.0.0.1:50051"},
                    {"name": "moefleet-router-1", "address": "10.0.0.2:50051"}],
    }


# ---- the token -----------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, ""], ids=["none", "empty"])
def test_without_a_configured_token_every_call_passes(token: str | None) -> None:
    servicer = AdminServicer(None, token)
    for context in (_Context(), _Context(("authorization", "Bearer whatever")),
                    _Context(("user-agent", "grpc-python"))):
        assert servicer._authorize(context) is None


def test_a_call_without_the_token_is_unauthenticated_and_the_right_one_still_passes() -> None:
    servicer = AdminServicer(None, TOKEN)
    for context in (_Context(), _Context(("user-agent", "grpc-python")), _Context(("authorization", ""))):
        with pytest.raises(Unauthenticated, match="Bearer <token>") as err:
            servicer._authorize(context)
        assert err.value.code == "UNAUTHENTICATED"
    assert servicer._authorize(_Context(("authorization", f"Bearer {TOKEN}"))) is None


@pytest.mark.parametrize("given", [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", TOKEN, f"bearer {TOKEN}",
                                   f"Bearer  {TOKEN}", "Bearer ünïcode"],
                         ids=["longer", "shorter", "no-scheme", "lowercase", "two-spaces", "non-ascii"])
def test_a_wrong_token_is_permission_denied_and_the_right_one_still_passes(given: str) -> None:
    servicer = AdminServicer(None, TOKEN)
    with pytest.raises(PermissionDenied, match="does not match") as err:
        servicer._authorize(_Context(("user-agent", "x"), ("authorization", given)))
    assert err.value.code == "PERMISSION_DENIED"
    assert servicer._authorize(_Context(("user-agent", "x"), ("authorization", f"Bearer {TOKEN}"))) is None


def test_status_checks_the_token_before_asking_the_controller() -> None:
    controller = _Controller(_status())
    servicer = AdminServicer(controller, TOKEN)
    with pytest.raises(PermissionDenied):
        asyncio.run(servicer.Status(pb.StatusRequest(model="tiny"), _Context(("authorization", "Bearer no"))))
    assert controller.calls == []
    reply = asyncio.run(servicer.Status(pb.StatusRequest(model="tiny"),
                                        _Context(("authorization", f"Bearer {TOKEN}"))))
    assert controller.calls == ["tiny"]
    assert status_from_proto(reply) == _status()


# ---- status conversion ---------------------------------------------------------------------


def test_status_survives_to_proto_and_back_with_its_types() -> None:
    status = _status()
    back = status_from_proto(pb.StatusResponse.FromString(status_to_proto(status).SerializeToString()))
    assert back == status
    m = back["models"][0]
    assert type(m["routing_version"]) is int and m["routing_version"] == 2**40 + 3  # not a JSON string
    assert type(m["autoscaling"]["enabled"]) is bool
    assert type(m["autoscaling"]["max_replicas"]) is int
    assert m["layers"][0]["experts"][0]["tokens_per_s"] == 1234.5625
    assert m["layers"][0]["experts"][0]["replicas"] == [{"host": "tiny-host-0", "slot": 0},
                                                        {"host": "tiny-host-1", "slot": 5}]
    assert m["layers"][0]["experts"][1]["replicas"] == []


def test_host_keys_outside_host_status_are_dropped_and_the_rest_kept() -> None:
    status = _status()
    status["hosts"][0]["kernel_backend"] = "triton"  # host info may carry more than the proto
    back = status_from_proto(status_to_proto(status))
    assert back["hosts"] == _status()["hosts"]


def test_an_empty_status_converts_to_empty_lists() -> None:
    empty = {"models": [], "hosts": [], "routers": []}
    assert status_from_proto(status_to_proto(empty)) == empty


def _rebalancing_controller(calls: list) -> SimpleNamespace:
    """A Controller handle whose `rebalance.remote` records its arguments and answers a plan."""
    async def remote(*args, **kwargs) -> dict[str, Any]:
        calls.append((args, kwargs))
        return {"routing_version": 9, "moves": 4, "moves_from_scratch": 30, "imbalance_before": 3.0,
                "imbalance_after": 1.5, "host_imbalance_before": 1.4, "host_imbalance_after": 1.1,
                "replicas_requested": 40, "replicas_placed": 38, "moves_uncut": 12,
                "host_imbalance_uncut": 1.01}
    return SimpleNamespace(rebalance=SimpleNamespace(remote=remote))


def test_rebalance_passes_the_knob_only_when_set_and_answers_the_shortfall_and_the_cut() -> None:
    calls: list = []
    servicer = AdminServicer(_rebalancing_controller(calls))
    reply = asyncio.run(servicer.Rebalance(pb.RebalanceRequest(
        model="tiny", replicas=40, max_moves=4, allow_partial=True), _Context()))
    asyncio.run(servicer.Rebalance(pb.RebalanceRequest(model="tiny", min_gain=0.01), _Context()))
    assert calls == [((), {"model": "tiny", "replicas": 40, "allow_partial": True, "max_moves": 4}),
                     ((), {"model": "tiny", "replicas": 0, "allow_partial": False, "min_gain": 0.01})]
    assert (reply.replicas_requested, reply.replicas_placed, reply.moves, reply.moves_uncut) == (
        40, 38, 4, 12)
    assert (reply.host_imbalance_before, reply.host_imbalance_after, reply.host_imbalance_uncut) == (
        1.4, 1.1, 1.01)


@pytest.mark.parametrize("grace_s", [float("nan"), -1.0, float("inf"), 1e9])
def test_a_shutdown_grace_that_is_not_a_time_is_refused_and_nothing_stops(grace_s: float) -> None:
    stopped: list = []

    async def remote(*, grace_s: float) -> list[str]:
        stopped.append(grace_s)
        return ["tiny"]

    servicer = AdminServicer(SimpleNamespace(shutdown_service=SimpleNamespace(remote=remote)))
    with pytest.raises(InvalidArgument, match=r"grace_s must be 0 … 3600 s"):
        asyncio.run(servicer.Shutdown(pb.ShutdownRequest(grace_s=grace_s), _Context()))
    assert stopped == []
    assert asyncio.run(servicer.Shutdown(pb.ShutdownRequest(), _Context())).models == ["tiny"]
    assert stopped == [5.0]  # unset: the default
