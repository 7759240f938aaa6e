"""`moefleet serve --checkpoint DIR`, the way an operator runs it on an HF checkpoint: the
served name defaults to the directory's (here overridden with --name), loading reports
replicas, bytes and time, and every MoE layer answers like the transformers block. A bad
checkpoint is refused before Ray starts, with the file, key or field named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moefleet.client import Client
from tests.e2e.conftest import read_address, stop

pytest.importorskip("transformers")  # the `hf` extra; tests/run.sh installs it
from tests.hf_models import save_tiny  # noqa: E402

pytestmark = pytest.mark.e2e
CLI = str(Path(sys.executable).with_name("moefleet"))
ENV = {**os.environ, "RAY_ADDRESS": "", "MOEFLEET_TOKEN": ""}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "Tiny-Mixtral"
    return path, save_tiny("mixtral", path, max_shard_size="100KB")


def test_serve_checkpoint_loads_with_progress_and_answers_like_transformers(ckpt, tmp_path):
    path, model = ckpt
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [CLI, "serve", "--checkpoint", str(path), "--name", "mixtral-e2e", "--dtype", "float32",
             "--hosts", "2", "--host", "127.0.0.1", "--port", "0", "--num-cpus", "4"],
            stdout=subprocess.PIPE, stderr=log, text=True, env=ENV)
        try:
            address = read_address(proc, log_path)
            layers = list(range(model.config.num_hidden_layers))
            n = len(layers) * model.config.num_local_experts
            assert f"loaded {n} expert replicas of 'mixtral-e2e'" in log_path.read_text()
            x = torch.randn(20, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
            with Client(address) as c:
                (served,) = c.status("mixtral-e2e").models
                assert sorted(L.layer for L in served.layers) == layers
                for L in layers:
                    with torch.no_grad():
                        want = model.model.layers[L].mlp(x[None])[0]
                    torch.testing.assert_close(c.infer("mixtral-e2e", L, x), want, rtol=1e-5, atol=1e-6)
        finally:
            stop(proc)
    assert proc.returncode == 0


def _serve_fails(*args: str) -> str:
    r = subprocess.run([CLI, "serve", *args, "--port", "0"], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.returncode != 0 and r.stdout == ""
    assert "Started a local Ray" not in r.stderr  # refused before any Ray
    return r.stderr


def test_bad_checkpoints_are_refused_naming_what_is_wrong(ckpt, tmp_path):
    path, _ = ckpt
    assert "cannot read config.json" in _serve_fails("--checkpoint", str(tmp_path / "missing"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "model_type 'llama' is not supported" in _serve_fails("--checkpoint", str(tmp_path / "llama"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"weights: {{checkpoint: {path}}}\nlayers: [0, 7]\n")
    assert "layers [7] are not MoE layers" in _serve_fails(str(spec))
    assert "exactly one" in _serve_fails(str(spec), "--checkpoint", str(path))
