"""Bringing a service up from an HF checkpoint: loading reports its progress, and a bad
checkpoint fails the start with an error that names the file, leaving nothing behind that
serves. (Layer and whole-model parity per family: test_hf_service.py.)"""

from __future__ import annotations

import json

import pytest
import ray
import torch

from moefleet.client import Client
from moefleet.cluster import service
from moefleet.cluster.hosts import NAMESPACE
from moefleet.cluster.model import expert_nbytes
from moefleet.cluster.spec import spec_for_checkpoint
from moefleet.testing import Reference

pytest.importorskip("transformers")  # the `hf` extra; tests/run.sh installs it
from tests.hf_models import save_tiny  # noqa: E402

pytestmark = pytest.mark.integration


def _spec(path, **kw):
    spec = spec_for_checkpoint(path, num_hosts=2, **kw)
    spec.hosts.num_cpus = spec.router.num_cpus = 0.25
    return spec


def _named_actors() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}


def test_loading_reports_progress_and_serves_the_checkpoint(ray_session, tmp_path):
    save_tiny("qwen3_moe", tmp_path / "qwen3-tiny", max_shard_size="100KB")
    spec = _spec(tmp_path / "qwen3-tiny", dtype="bfloat16")
    reports = []
    svc = service.start(spec, port=0, host="127.0.0.1", on_progress=reports.append)
    try:
        total = len(spec.layers) * spec.moe.n_routed_experts
        last = reports[-1]
        assert (last["loaded"], last["total"]) == (total, total)
        assert last["bytes"] == last["total_bytes"] == total * expert_nbytes(spec)
        assert last["elapsed_s"] > 0
        assert all(a["loaded"] <= b["loaded"] for a, b in zip(reports, reports[1:], strict=False))
        x = torch.randn(16, spec.moe.hidden_size, generator=torch.Generator().manual_seed(0))
        x = x.to(torch.bfloat16)
        ref = Reference(spec)
        with Client(svc.address) as c:
            for L in spec.layers:
                y = c.infer("qwen3-tiny", L, x)
                assert y.dtype == torch.bfloat16
                torch.testing.assert_close(y.float(), ref(L, x).float(), rtol=2e-2, atol=2e-2)
    finally:
        svc.shutdown()


def test_truncated_shard_fails_the_start_and_nothing_is_left_serving(ray_session, tmp_path):
    path = tmp_path / "v2-tiny"
    save_tiny("deepseek_v2", path, max_shard_size="100KB")
    spec = _spec(path)  # config.json is fine: the spec is built
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"]["model.layers.2.mlp.experts.9.gate_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:-64])
    before = _named_actors()
    with pytest.raises(ValueError, match=rf"{shard.name}: not a readable safetensors file \(truncated"):
        service.start(spec, port=0, host="127.0.0.1")
    assert _named_actors() == before  # no Controller, host or router stays behind
