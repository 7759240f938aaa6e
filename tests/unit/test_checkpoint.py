"""HF checkpoints, without Ray: config.json → spec for each family, tensors read in every
layout, the in-process layer equal to the transformers block, FP8 dequantisation, and bad
checkpoints failing with errors that name the file, key or field."""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moefleet.cluster.model import gate_of, source_args, source_of
from moefleet.cluster.spec import ModelSpec, spec_for_checkpoint
from moefleet.core.config import SpecError
from moefleet.experts.checkpoint import CheckpointError, CheckpointSource
from moefleet.experts.hf_config import from_dict
from moefleet.experts.host import ExpertHost
from moefleet.experts.kernels import grouped_swiglu
from moefleet.experts.reference import ExpertWeights, SharedExperts
from moefleet.router.dispatch import LayerTable, combine, plan
from moefleet.router.gating import route
from moefleet.testing import Reference

pytest.importorskip("transformers")  # the `hf` extra; tests/run.sh installs it
from tests.hf_models import DENSE_LAYERS, FAMILIES, save_tiny, tiny_config  # noqa: E402

pytestmark = pytest.mark.unit
_HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, object]]:
    """(family, layout) -> (checkpoint dir, the transformers model it holds); layouts are
    per_expert (one file), sharded (an index and several files) and fused."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        for layout, kw in (("per_expert", {}), ("sharded", {"max_shard_size": "100KB"}),
                           ("fused", {"fused": True})):
            path = root / f"{family}-{layout}"
            out[family, layout] = path, save_tiny(family, path, **kw)
    return out


def _x(h: int, seed: int, t: int = 24) -> torch.Tensor:
    return torch.randn(t, h, generator=torch.Generator().manual_seed(seed))  # [T, H]


# ---- config.json -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_from_checkpoint_takes_name_layers_and_moe_from_config(checkpoints, family):
    path, model = checkpoints[family, "per_expert"]
    spec = ModelSpec.from_dict({"weights": {"checkpoint": str(path)}})
    cfg = model.config
    assert spec.name == path.name and spec.dtype == "float32"
    assert spec.layers == [L for L in range(cfg.num_hidden_layers) if L not in DENSE_LAYERS[family]]
    assert spec.moe.hidden_size == cfg.hidden_size
    assert spec.moe.num_experts_per_tok == cfg.num_experts_per_tok
    assert spec.moe.n_routed_experts == model.model.layers[spec.layers[0]].mlp.experts.num_experts


def test_sparse_layers_follow_first_dense_layers_and_layer_frequency():
    ds = from_dict({"model_type": "deepseek_v2", "hidden_size": 8, "moe_intermediate_size": 4,
                    "n_routed_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 8,
                    "first_k_dense_replace": 2, "moe_layer_freq": 2})
    assert ds.moe_layers == [2, 4, 6]
    qwen = from_dict({"model_type": "qwen2_moe", "hidden_size": 8, "moe_intermediate_size": 4,
                      "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 8,
                      "shared_expert_intermediate_size": 8, "decoder_sparse_step": 2,
                      "mlp_only_layers": [3]})
    assert qwen.moe_layers == [1, 5, 7]


def test_family_gating_defaults():
    base = {"hidden_size": 8, "num_experts_per_tok": 2, "num_hidden_layers": 1}
    mixtral = from_dict({**base, "model_type": "mixtral", "intermediate_size": 4, "num_local_experts": 4})
    assert mixtral.moe["norm_topk_prob"] is True  # Mixtral always renormalises
    v3 = from_dict({**base, "model_type": "deepseek_v3", "moe_intermediate_size": 4, "n_routed_experts": 4})
    assert (v3.moe["scoring_func"], v3.moe["topk_method"]) == ("sigmoid", "noaux_tc")
    with pytest.raises(CheckpointError, match="'scoring_func' is 'softmax'; deepseek_v3 uses 'sigmoid'"):
        from_dict({**base, "model_type": "deepseek_v3", "moe_intermediate_size": 4, "n_routed_experts": 4,
                   "scoring_func": "softmax"})


# ---- tensors --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["per_expert", "sharded", "fused"])
def test_layer_equals_the_transformers_block(checkpoints, family, layout):
    """The in-process layer the service is held to (gating + experts + shared experts, read
    from the checkpoint) gives the transformers block's output, in fp32."""
    path, model = checkpoints[family, layout]
    spec = ModelSpec.from_dict({"weights": {"checkpoint": str(path)}})
    ref = Reference(spec)
    for L in spec.layers:
        x = _x(spec.moe.hidden_size, seed=L)
        with torch.no_grad():
            want = model.model.layers[L].mlp(x[None])[0]
        torch.testing.assert_close(ref(L, x), want, rtol=1e-5, atol=1e-6)


def _served_layer(spec: ModelSpec, layer: int, x: torch.Tensor, host: ExpertHost) -> torch.Tensor:
    """The service's maths for one layer, without Ray: the host's slots filled from the
    checkpoint, gating on x's device, plan, one grouped kernel call, combine, shared experts.
    x: [T, H] -> [T, H]"""
    e, k = spec.moe.n_routed_experts, spec.moe.num_experts_per_tok
    for i in range(e):
        host.load_weights_from(slot=i, layer=layer, expert=i, source=source_args(spec))
    topk_w, topk_ids = route(x, gate_of(spec, layer).to(x.device), spec.moe)  # [T, K]
    p = plan(topk_ids, LayerTable.from_replicas({i: [(0, i)] for i in range(e)}))
    (batch,) = p.batches
    per_slot = torch.zeros(e, dtype=torch.long)
    per_slot[batch.slot_ids] = batch.counts
    offsets = torch.cat([per_slot.new_zeros(1), per_slot.cumsum(0)]).to(x.device)  # [E+1]
    y = grouped_swiglu(x[p.tokens(k).to(x.device)], host.w13, host.w2, offsets, backend=host.kernel_backend)
    shared = source_of(spec).shared(layer)
    out = None
    if shared is not None:
        ffn = ExpertWeights(*(w.to(x.device) for w in (shared.ffn.w1, shared.ffn.w2, shared.ffn.w3)))
        gate = None if shared.gate is None else shared.gate.to(x.device)
        out = SharedExperts(ffn, gate)(x).float()  # [T, H]
    return combine(y, p, topk_w, x.shape[0], out).to(x.dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_host_kernel_path_equals_the_transformers_block(checkpoints, family):
    path, model = checkpoints[family, "fused"]
    spec = ModelSpec.from_dict({"weights": {"checkpoint": str(path)}})
    host = ExpertHost("h", num_slots=spec.moe.n_routed_experts, kernel_backend="torch", device="cpu")
    for L in spec.layers:
        x = _x(spec.moe.hidden_size, seed=10 + L)
        with torch.no_grad():
            want = model.model.layers[L].mlp(x[None])[0]
        torch.testing.assert_close(_served_layer(spec, L, x, host), want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_on_cuda_equals_the_transformers_block(checkpoints, family):
    """fp32: against the transformers block on the GPU. bf16: against the in-process
    reference in bf16 (the same routing in fp32; transformers' bf16 router logits can flip
    near-ties)."""
    path, model = checkpoints[family, "sharded"]
    model = copy.deepcopy(model).to("cuda")
    for dtype in ("float32", "bfloat16"):
        spec = ModelSpec.from_dict({"weights": {"checkpoint": str(path)}, "dtype": dtype})
        host = ExpertHost("gpu", num_slots=spec.moe.n_routed_experts, device="cuda", kernel_backend="triton")
        ref = Reference(spec)
        for L in spec.layers:
            x = _x(spec.moe.hidden_size, seed=20 + L, t=64).to(getattr(torch, dtype))
            y = _served_layer(spec, L, x.cuda(), host)
            if dtype == "float32":
                with torch.no_grad():
                    want = model.model.layers[L].mlp(x.cuda()[None])[0]
                torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(y.cpu().float(), ref(L, x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_every_layout_reads_the_same_tensors(checkpoints, family):
    srcs = {layout: CheckpointSource(str(checkpoints[family, layout][0]))
            for layout in ("per_expert", "sharded", "fused")}
    base = srcs.pop("per_expert")
    L = base.moe_layers[-1]
    for src in srcs.values():
        for e in range(base.config.moe["n_routed_experts"]):
            a, b = base.expert(L, e), src.expert(L, e)
            for name in ("w1", "w2", "w3"):
                torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)
        torch.testing.assert_close(src.gate(L).weight, base.gate(L).weight, rtol=0, atol=0)


def test_sharded_checkpoint_really_has_several_shards(checkpoints):
    path = checkpoints["qwen2_moe", "sharded"][0]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2


def test_dtype_conversion_is_explicit_and_the_router_stays_fp32(checkpoints):
    path = checkpoints["deepseek_v3", "per_expert"][0]
    fp32, bf16 = CheckpointSource(str(path)), CheckpointSource(str(path), "bfloat16")
    a, b = fp32.expert(1, 5), bf16.expert(1, 5)
    assert b.w1.dtype == torch.bfloat16
    torch.testing.assert_close(b.w2, a.w2.to(torch.bfloat16), rtol=0, atol=0)
    assert bf16.gate(1).weight.dtype == torch.float32 and bf16.gate(1).bias.dtype == torch.float32
    assert bf16.shared(1).ffn.w1.dtype == torch.bfloat16
    spec = spec_for_checkpoint(path, dtype="bfloat16", num_hosts=2)
    assert spec.dtype == "bfloat16" and spec.hosts.count == 2
    assert spec.hosts.count * spec.hosts.slots >= len(spec.layers) * spec.moe.n_routed_experts


def test_check_counts_the_experts_bytes(checkpoints):
    path, model = checkpoints["olmoe", "fused"]
    src = CheckpointSource(str(path))
    c = model.config
    want = len(src.moe_layers) * c.num_experts * 3 * c.hidden_size * c.intermediate_size * 4
    assert src.check(src.moe_layers) == want


# ---- FP8 -----------------------------------------------------------------------------------


def _quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] -> (FP8 [out, in], scale_inv [ceil(out/b), ceil(in/b)]): DeepSeek's scheme."""
    out_b, in_b = -(-w.shape[0] // block), -(-w.shape[1] // block)
    padded = torch.zeros(out_b * block, in_b * block)
    padded[: w.shape[0], : w.shape[1]] = w
    blocks = padded.view(out_b, block, in_b, block)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # e4m3's largest normal
    q = (blocks / scale[:, None, :, None]).view_as(padded)[: w.shape[0], : w.shape[1]]
    return q.to(torch.float8_e4m3fn), scale


def test_fp8_block_quantized_weights_are_dequantized_on_load(checkpoints, tmp_path):
    src_path = checkpoints["deepseek_v3", "per_expert"][0]
    block = 16  # moe_intermediate_size 48, hidden 64: whole blocks; shared 48 too
    tensors = load_file(str(src_path / "model.safetensors"))
    fp8 = {}
    for key, t in tensors.items():
        if ".experts." in key or ".shared_experts." in key:
            q, scale = _quantize_fp8(t, block)
            fp8[key], fp8[key.removesuffix(".weight") + ".weight_scale_inv"] = q, scale
        else:
            fp8[key] = t
    save_file(fp8, str(tmp_path / "model.safetensors"))
    config = json.loads((src_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block]}
    (tmp_path / "config.json").write_text(json.dumps(config))

    src, orig = CheckpointSource(str(tmp_path)), CheckpointSource(str(src_path))
    src.check(src.moe_layers)
    key = "model.layers.2.mlp.experts.7.down_proj.weight"
    s = fp8[key.replace(".weight", ".weight_scale_inv")]
    want = fp8[key].float() * s.repeat_interleave(block, 0).repeat_interleave(block, 1)
    torch.testing.assert_close(src.expert(2, 7).w2, want, rtol=0, atol=0)
    # and that is the original within FP8's precision (3 mantissa bits)
    torch.testing.assert_close(src.expert(2, 7).w2, orig.expert(2, 7).w2, rtol=0.07, atol=1e-3)
    assert src.shared(2).ffn.w1.dtype == torch.float32

    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="is FP8 but config.json has no fp8 quantization_config"):
        CheckpointSource(str(tmp_path)).expert(2, 7)


# ---- bad checkpoints -----------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_tensor_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints["qwen3_moe", "per_expert"][0], tmp_path / "ckpt")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    src = CheckpointSource(str(path))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.5\.up_proj"):
        src.check(src.moe_layers)
    src.expert(1, 4)  # the others still read


def test_shape_that_disagrees_with_config_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints["mixtral", "per_expert"][0], tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 40
    (path / "config.json").write_text(json.dumps(config))
    src = CheckpointSource(str(path))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' "
                                              r"has shape \[48, 64\]; .*implies \[40, 64\]"):
        src.check(src.moe_layers)


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    with pytest.raises(SpecError, match=r"model_type 'llama' is not supported; supported: \['deepseek_v2'"):
        ModelSpec.from_dict({"weights": {"checkpoint": str(tmp_path)}})


def test_non_swiglu_activation_is_refused(tmp_path):
    cfg = tiny_config("olmoe", hidden_act="gelu").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="hidden_act 'gelu' is not supported"):
        ModelSpec.from_dict({"weights": {"checkpoint": str(tmp_path)}})


def test_truncated_shard_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints["deepseek_v2", "sharded"][0], tmp_path / "ckpt")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"]["model.layers.2.mlp.experts.3.down_proj.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    src = CheckpointSource(str(path))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: not a readable safetensors file \(truncated"):
        src.check(src.moe_layers)


def test_unreadable_directory_is_named_with_the_host(tmp_path):
    missing = tmp_path / "not-mounted-here"
    with pytest.raises(SpecError, match="cannot read config.json"):
        ModelSpec.from_dict({"weights": {"checkpoint": str(missing)}})
    host = ExpertHost("h7", num_slots=2)
    with pytest.raises(CheckpointError, match=rf"host h7 on {socket.gethostname()}: .*cannot read config"):
        host.load_weights_from(slot=0, layer=1, expert=0,
                               source={"checkpoint": {"path": str(missing), "dtype": "float32"}})
    assert host.slots == {}


def test_spec_must_agree_with_config(checkpoints):
    path = checkpoints["deepseek_v3", "per_expert"][0]
    with pytest.raises(SpecError, match=r"layers \[0\] are not MoE layers"):
        ModelSpec.from_dict({"weights": {"checkpoint": str(path)}, "layers": [0, 1]})
    with pytest.raises(SpecError, match="moe: n_routed_experts is 8 but .*config.json gives 16"):
        ModelSpec.from_dict({"weights": {"checkpoint": str(path)}, "moe": {"num_experts": 8}})
    spec = ModelSpec.from_dict({"weights": {"checkpoint": str(path)}, "layers": [2], "name": "v3"})
    assert (spec.name, spec.layers) == ("v3", [2])
