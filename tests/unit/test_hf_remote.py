"""remote_moe on tiny random transformers models, one per family, with no service: a fake
Client answers each layer with a deep copy of the model's own MoE block. Logits, greedy
generation and router_logits equal the unmodified model's; only sparse blocks are swapped."""

from __future__ import annotations

import copy

import pytest

transformers = pytest.importorskip("transformers")

import grpc  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from moefleet.hf import RemoteMoE, close, remote_moe  # noqa: E402
from moefleet.hf import remote as remote_module  # noqa: E402
from moefleet.protos import admin_pb2  # noqa: E402
from tests.hf_models import DENSE_LAYERS, FAMILIES, tiny_model  # noqa: E402

pytestmark = pytest.mark.unit

NEW_TOKENS = 20


class _NotFound(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.NOT_FOUND


class _FakeService:
    """Stands in for moefleet.client.Client: layer L answers with `blocks[L]`, a deep copy of
    the original block (never part of a model, so no HF hook ever sits on its router)."""

    def __init__(self, blocks: dict[int, nn.Module], name: str, hidden_size: int,
                 served: list[int] | None = None):
        self.blocks, self.name, self.hidden_size = blocks, name, hidden_size
        self.served = sorted(blocks) if served is None else served
        self.calls: list[tuple[str, int, int]] = []  # (model, layer, tokens)
        self.timeouts: set[float | None] = set()
        self.closed = 0

    def __call__(self, address: str, token: str | None = None) -> _FakeService:  # the Client class
        return self

    def infer(self, model: str, layer: int, x: torch.Tensor, timeout_s: float | None = None):
        assert x.dim() == 2 and not x.requires_grad
        self.calls.append((model, layer, x.shape[0]))
        self.timeouts.add(timeout_s)
        with torch.no_grad():
            return self.blocks[layer](x[None])[0]  # [T, H]

    def status(self, model: str = "", timeout_s: float = 10.0) -> admin_pb2.StatusResponse:
        if model and model != self.name:
            raise _NotFound()
        layers = [admin_pb2.LayerStatus(layer=L) for L in self.served]
        return admin_pb2.StatusResponse(models=[admin_pb2.ModelStatus(
            name=self.name, hidden_size=self.hidden_size, layers=layers)])

    def close(self) -> None:
        self.closed += 1


def _sparse_layers(family: str) -> list[int]:
    return [L for L in range(3) if L not in DENSE_LAYERS[family]]


def _pair(family: str, monkeypatch, **fake_kw):
    """(local model, remote model, fake service): identical weights, copied before any forward."""
    remote = tiny_model(family)
    local = copy.deepcopy(remote)
    blocks = {L: copy.deepcopy(remote.model.layers[L].mlp) for L in _sparse_layers(family)}
    fake = _FakeService(blocks, "tiny", remote.config.hidden_size, **fake_kw)
    monkeypatch.setattr(remote_module, "Client", fake)
    return local, remote, fake


def _prompt(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(5))


# ---- parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_local_model(family, monkeypatch):
    local, remote, fake = _pair(family, monkeypatch)
    remote_moe(remote, "fake:1", model_name="tiny")
    ids = _prompt()
    with torch.no_grad():
        want, got = local(ids).logits, remote(ids).logits  # [B, S, V]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert fake.calls == [("tiny", L, ids.numel()) for L in _sparse_layers(family)]
    assert fake.timeouts == {60.0}


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_output_moves_the_logits(family, monkeypatch):
    """The parity above is not vacuous: zeroing the blocks' output changes the logits a lot."""
    local, remote, _ = _pair(family, monkeypatch)
    remote_moe(remote, "fake:1", model_name="tiny")
    for m in remote.modules():
        if isinstance(m, RemoteMoE):
            m.infer = lambda layer, x: torch.zeros_like(x)
    ids = _prompt()
    with torch.no_grad():
        diff = (remote(ids).logits - local(ids).logits).abs().max().item()
    assert diff > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_gives_the_same_20_tokens(family, monkeypatch):
    local, remote, fake = _pair(family, monkeypatch)
    remote_moe(remote, "fake:1", model_name="tiny")
    ids = _prompt(batch=1, length=6)
    kw = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    want, got = local.generate(ids, **kw), remote.generate(ids, **kw)  # [1, 6 + 20]
    assert want.shape == (1, 6 + NEW_TOKENS)
    assert torch.equal(got, want)
    assert len(set(want[0, 6:].tolist())) > 1  # not one token repeated
    # prefill (6 tokens) once, then one token per step, for every sparse layer
    tokens = [t for _, L, t in fake.calls if L == _sparse_layers(family)[0]]
    assert tokens == [6] + [1] * (NEW_TOKENS - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_logits_equal_the_local_model(family, monkeypatch):
    local, remote, _ = _pair(family, monkeypatch)
    ids = _prompt()
    with torch.no_grad():
        local(ids, output_router_logits=True)  # hooks installed before the swap stay on the router
        want = local(ids, output_router_logits=True).router_logits
        remote_moe(remote, "fake:1", model_name="tiny")
        got = remote(ids, output_router_logits=True).router_logits
    assert len(want) == len(got) == len(_sparse_layers(family))
    for w, g in zip(want, got, strict=True):
        assert g.shape == w.shape and g.shape[0] == ids.numel()  # [T, E]
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---- what is swapped -----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_only_sparse_blocks_are_replaced(family, monkeypatch):
    _, remote, fake = _pair(family, monkeypatch)
    before = [(layer.mlp, layer.self_attn, layer.mlp.__class__.__name__) for layer in remote.model.layers]
    gates = {L: remote.model.layers[L].mlp.gate for L in _sparse_layers(family)}
    assert remote_moe(remote, "fake:1", model_name="tiny") is remote
    for L, layer in enumerate(remote.model.layers):
        mlp, attn, cls = before[L]
        assert layer.self_attn is attn
        if L in DENSE_LAYERS[family]:
            assert layer.mlp is mlp and cls.endswith("MLP")  # a dense MLP, kept
        else:
            assert isinstance(layer.mlp, RemoteMoE) and layer.mlp.layer == L
            assert layer.mlp.gate is gates[L]
    assert sorted(m.layer for m in remote.modules() if isinstance(m, RemoteMoE)) == _sparse_layers(family)
    with pytest.raises(ValueError, match="already remote"):
        remote_moe(remote, "fake:1", model_name="tiny")


def test_mixtral_block_under_its_old_attribute_name_is_found(monkeypatch):
    _, remote, _ = _pair("mixtral", monkeypatch)
    for layer in remote.model.layers:
        layer.block_sparse_moe = layer.mlp  # transformers < 5 names it so
        del layer.mlp
    remote_moe(remote, "fake:1", model_name="tiny")
    assert [type(layer.block_sparse_moe) for layer in remote.model.layers] == [RemoteMoE] * 3


def test_unsupported_model_type_is_an_error_listing_the_supported():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="'llama' is not supported; supported: deepseek_v2, deepseek_v3, "
                                         "mixtral, olmoe, qwen2_moe, qwen3_moe"):
        remote_moe(model, "fake:1", model_name="tiny")


def test_a_model_without_sparse_blocks_is_an_error():
    model = tiny_model("qwen2_moe", mlp_only_layers=[0, 1, 2])
    with pytest.raises(ValueError, match="no Qwen2MoeSparseMoeBlock in the 3 decoder layers"):
        remote_moe(model, "fake:1", model_name="tiny")


# ---- the service side ----------------------------------------------------------------------


def test_a_layer_the_service_lacks_is_named_and_nothing_is_swapped(monkeypatch):
    _, remote, fake = _pair("deepseek_v3", monkeypatch, served=[1])
    with pytest.raises(ValueError, match=r"does not serve layer\(s\) \[2\] of 'tiny'; it serves \[1\]"):
        remote_moe(remote, "fake:1", model_name="tiny")
    assert not any(isinstance(m, RemoteMoE) for m in remote.modules())
    assert fake.closed == 1


def test_an_unknown_model_name_is_an_error_naming_the_served_ones(monkeypatch):
    _, remote, fake = _pair("olmoe", monkeypatch)
    with pytest.raises(ValueError, match=r"does not serve a model 'other' \(it serves \['tiny'\]\)"):
        remote_moe(remote, "fake:1", model_name="other")
    assert fake.closed == 1


def test_default_model_name_is_the_checkpoint_directory(monkeypatch):
    _, remote, fake = _pair("qwen3_moe", monkeypatch)
    remote.config._name_or_path = "/models/tiny/"
    remote_moe(remote, "fake:1")
    with torch.no_grad():
        remote(_prompt())
    assert {name for name, _, _ in fake.calls} == {"tiny"}


def test_a_model_built_from_a_config_needs_a_model_name(monkeypatch):
    _, remote, _ = _pair("qwen3_moe", monkeypatch)
    with pytest.raises(ValueError, match="pass model_name"):
        remote_moe(remote, "fake:1")


def test_close_closes_the_one_client_all_layers_share(monkeypatch):
    _, remote, fake = _pair("mixtral", monkeypatch)
    remote_moe(remote, "fake:1", model_name="tiny")
    assert len({id(m.infer) for m in remote.modules() if isinstance(m, RemoteMoE)}) == 1
    close(remote)
    assert fake.closed == 1


# ---- RemoteMoE on its own ------------------------------------------------------------------


def test_output_takes_the_input_dtype_and_shape():
    m = RemoteMoE(3, nn.Identity(), lambda layer, x: (x.float() * layer))  # answers in fp32
    x = torch.randn(2, 5, 8).to(torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 8)
    torch.testing.assert_close(y, x * 3)


def test_a_transformers4_block_also_returns_the_router_logits():
    """Before v5, Mixtral/Qwen/OLMoE gates were bare nn.Linear and blocks returned (y, logits)."""
    gate = nn.Linear(8, 4, bias=False)
    m = RemoteMoE(0, gate, lambda layer, x: -x)
    x = torch.randn(2, 5, 8)
    y, logits = m(x)
    torch.testing.assert_close(y, -x)
    torch.testing.assert_close(logits, x.reshape(10, 8) @ gate.weight.T)  # [T, E]
