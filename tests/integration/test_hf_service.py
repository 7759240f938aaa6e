"""A transformers checkpoint served by moefleet answers like the model itself: each MoE layer
over gRPC equals the model's own block, and the whole model with `remote_moe` gives the same
logits and the same greedy tokens. One tiny random checkpoint per family, plus a sharded one
(several safetensors files and an index) and one in the transformers-v5 fused expert layout.

Needs the checkpoint loader (`weights: {checkpoint: DIR}`) and the `hf` extra."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from moefleet.client import Client  # noqa: E402
from moefleet.cluster import service  # noqa: E402
from moefleet.cluster.spec import ModelSpec  # noqa: E402
from moefleet.hf import RemoteMoE, close, remote_moe  # noqa: E402
from tests.hf_models import DENSE_LAYERS, FAMILIES, save_tiny  # noqa: E402

pytestmark = pytest.mark.integration

NEW_TOKENS = 20
# (case id, family, save_tiny keywords)
CASES = [(f, f, {}) for f in FAMILIES] + [
    ("qwen2_moe-sharded", "qwen2_moe", {"max_shard_size": "100KB"}),
    ("deepseek_v3-fused", "deepseek_v3", {"fused": True}),
]


@dataclass
class _Served:
    family: str
    ckpt: Path
    model: transformers.PreTrainedModel  # the unmodified model that was saved
    svc: service.Service

    @property
    def name(self) -> str:
        return self.ckpt.name

    @property
    def sparse(self) -> list[int]:
        n = self.model.config.num_hidden_layers
        return [L for L in range(n) if L not in DENSE_LAYERS[self.family]]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def served(request, ray_session, tmp_path_factory):
    case, family, save_kw = request.param
    ckpt = tmp_path_factory.mktemp(case) / f"tiny-{case}"
    model = save_tiny(family, ckpt, **save_kw)
    if "max_shard_size" in save_kw:
        assert (ckpt / "model.safetensors.index.json").exists()
        assert len(list(ckpt.glob("model-*.safetensors"))) >= 2
    spec = ModelSpec.from_dict({"weights": {"checkpoint": str(ckpt)}, "dtype": "float32",
                                "hosts": {"count": 2, "num_cpus": 0.25, "slots": 64},
                                "router": {"num_cpus": 0.25}})
    svc = service.start(spec, port=0, host="127.0.0.1")
    try:
        yield _Served(family, ckpt, model, svc)
    finally:
        svc.shutdown()


def test_service_serves_the_sparse_layers_under_the_directory_name(served):
    with Client(served.svc.address) as c:
        (m,) = c.status(served.name).models
    assert m.name == served.name
    assert [L.layer for L in m.layers] == served.sparse
    assert m.hidden_size == served.model.config.hidden_size


def test_each_layer_equals_the_models_own_block(served):
    g = torch.Generator().manual_seed(0)
    H = served.model.config.hidden_size
    with Client(served.svc.address) as c, torch.no_grad():
        for L in served.sparse:
            h = torch.randn(16, H, generator=g)  # [T, H]
            want = served.model.model.layers[L].mlp(h[None])[0]
            torch.testing.assert_close(c.infer(served.name, L, h), want, rtol=1e-5, atol=1e-6)


def test_whole_model_with_remote_moe_matches_the_local_model(served):
    local = served.model
    remote = transformers.AutoModelForCausalLM.from_pretrained(str(served.ckpt), dtype=torch.float32).eval()
    remote_moe(remote, served.svc.address)  # the model name defaults to the directory's
    try:
        assert sorted(m.layer for m in remote.modules() if isinstance(m, RemoteMoE)) == served.sparse
        ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))  # [B, S]
        with torch.no_grad():
            want = local(ids, output_router_logits=True)
            got = remote(ids, output_router_logits=True)
        # fp32 throughout; the service sums experts in its own order (~1e-7 relative per layer)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        for g, w in zip(got.router_logits, want.router_logits, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)

        prompt = ids[:1, :6]
        kw = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
        want_ids, got_ids = local.generate(prompt, **kw), remote.generate(prompt, **kw)
        assert want_ids.shape == (1, 6 + NEW_TOKENS)
        assert got_ids.tolist() == want_ids.tolist()
    finally:
        close(remote)
