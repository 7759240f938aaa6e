"""The operator's commands against a started `moefleet serve`: the admin token is enforced,
`scale`, `add-expert`, `remove-expert`, `rebalance`, `autoscale` and `top` change and show
the service, and every answer afterwards matches the reference of its routing version.

Runs after test_e2e.py (file order) and leaves the service as it found it: one replica of
each of the spec's experts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moefleet.client import Client
from moefleet.testing import VersionedReference
from tests.elastic import new_expert

pytestmark = pytest.mark.e2e

_CLI = str(Path(sys.executable).with_name("moefleet"))


def _run(served, *args: str, token: str | None = "ok") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MOEFLEET_TOKEN", "MOEFLEET_SERVER")}
    if token == "ok":
        env["MOEFLEET_TOKEN"] = served.token
    elif token is not None:
        env["MOEFLEET_TOKEN"] = token
    return subprocess.run([_CLI, *args, "--server", served.address], capture_output=True,
                          text=True, timeout=120, env=env)


def _status(served) -> dict:
    out = _run(served, "status", "-o", "json")
    assert out.returncode == 0, out.stderr
    (model,) = json.loads(out.stdout)["models"]
    return model


def _replicas(model: dict, layer: int, expert: int) -> int:
    (L,) = [L for L in model["layers"] if L["layer"] == layer]
    (e,) = [e for e in L["experts"] if e["expert"] == expert]
    return len(e["replicas"])


@pytest.mark.parametrize("token, code", [(None, "UNAUTHENTICATED"), ("wrong", "PERMISSION_DENIED")])
def test_admin_commands_need_the_token(served, token, code):
    for args in (["status"], ["scale", served.spec.name, "--layer", "1", "--replicas", "2"]):
        out = _run(served, *args, token=token)
        assert out.returncode == 1 and code in out.stderr, out.stderr
    assert _status(served)["routing_version"] >= 1  # and with it, it answers


def test_scale_changes_replicas_and_answers_stay_right(served):
    name = served.spec.name
    out = _run(served, "scale", name, "--layer", "1", "--expert", "2", "--replicas", "2")
    assert out.returncode == 0, out.stderr
    assert _replicas(_status(served), 1, 2) == 2
    _check_answers(served, VersionedReference(served.spec))
    out = _run(served, "scale", name, "--layer", "1", "--expert", "2", "--replicas", "1")
    assert out.returncode == 0, out.stderr
    assert _replicas(_status(served), 1, 2) == 1


def test_add_expert_prints_its_id_and_remove_expert_takes_it_away(served, tmp_path):
    spec, ref = served.spec, VersionedReference(served.spec)
    new = new_expert(spec, seed=21, scale=3.0)
    path = tmp_path / "expert.safetensors"
    path.write_bytes(new.data)
    out = _run(served, "add-expert", spec.name, "--layer", "3", "--weights", str(path),
               "--group", "2")
    assert out.returncode == 0, out.stderr
    expert = int(out.stdout.strip())
    assert expert == spec.moe.n_routed_experts  # the next free id
    added_at = _status(served)["routing_version"]
    new.record(ref, added_at, 3, expert, group=2)
    _check_answers(served, ref, layer=3)
    out = _run(served, "remove-expert", spec.name, "--layer", "3", "--expert", str(expert))
    assert out.returncode == 0, out.stderr
    model = _status(served)
    ref.removed(model["routing_version"], 3, expert)
    assert expert not in [e["expert"] for L in model["layers"] for e in L["experts"]]
    _check_answers(served, ref, layer=3)


def test_rebalance_autoscale_and_top_report_what_they_did(served):
    name = served.spec.name
    _check_answers(served, VersionedReference(served.spec))  # load for the Controller to measure
    out = _run(served, "rebalance", name)
    assert out.returncode == 0 and "moved" in out.stdout, out.stderr
    out = _run(served, "rebalance", name, "--max-moves", "1")  # a move is a remove and an add
    assert out.returncode == 0 and "moved 0 replica(s)" in out.stdout, out.stderr
    assert "per-host load max/mean" in out.stdout and "SHORT" not in out.stdout
    out = _run(served, "autoscale", name, "--on", "--target-tokens-per-s", "5000",
               "--max-replicas", "2")
    assert out.returncode == 0 and "autoscaling on" in out.stdout, out.stderr
    assert _status(served)["autoscaling"]["target_tokens_per_s"] == 5000
    out = _run(served, "autoscale", name, "--off")
    assert out.returncode == 0 and "autoscaling off" in out.stdout, out.stderr
    out = _run(served, "top", "--iterations", "1")
    assert out.returncode == 0, out.stderr
    assert f"MODEL {name}" in out.stdout
    assert all(f"L{layer}" in out.stdout for layer in served.spec.layers)
    for layer in served.spec.layers:  # leave one replica of every expert
        assert _run(served, "scale", name, "--layer", str(layer), "--replicas", "1").returncode == 0


def _check_answers(served, ref: VersionedReference, layer: int = 1, requests: int = 20) -> None:
    g = torch.Generator().manual_seed(layer)
    with Client(served.address) as c:
        for _ in range(requests):
            x = torch.randn(16, served.spec.moe.hidden_size, generator=g)
            y, version = c.infer_with_version(served.spec.name, layer, x)
            torch.testing.assert_close(y, ref(version, layer, x))
