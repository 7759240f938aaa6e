"""cluster/spec.py: a YAML/JSON spec maps one to one onto the dataclasses, HF's spellings are
accepted, and every spec that cannot be served is refused with a SpecError naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moefleet.cluster.autoscale import AutoscalingConfig
from moefleet.cluster.spec import ModelSpec, load_spec
from moefleet.core.config import DTYPE_NAMES, MoEConfig, SpecError
from moefleet.core.dtypes import TORCH_DTYPES

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]

MOE = {"hidden_size": 64, "moe_intermediate_size": 96, "n_routed_experts": 8,
       "num_experts_per_tok": 2}


def _spec(**over) -> dict:
    d = {"name": "m", "layers": [0, 3], "moe": dict(MOE), "weights": {"random": {"seed": 1}}}
    d.update(over)
    return d


def _moe(**over) -> dict:
    return {**MOE, **over}


# ---- loading -------------------------------------------------------------------------------


def test_tiny_example_loads_as_a_deepseek_v3_shaped_model() -> None:
    spec = load_spec(REPO / "deploy/examples/tiny.yaml")
    assert (spec.name, spec.layers, spec.dtype) == ("tiny", [0, 1], "float32")
    m = spec.moe
    assert (m.hidden_size, m.moe_intermediate_size, m.n_routed_experts) == (256, 128, 16)
    assert (m.num_experts_per_tok, m.n_group, m.topk_group) == (4, 4, 2)
    assert (m.scoring_func, m.topk_method, m.norm_topk_prob) == ("sigmoid", "noaux_tc", True)
    assert m.routed_scaling_factor == 2.5
    assert (m.n_shared_experts, m.shared_intermediate_size, m.shared_expert_gate) == (1, 128, False)
    assert spec.weights.random == {"seed": 0} and spec.weights.safetensors is None
    assert (spec.hosts.count, spec.hosts.num_cpus, spec.hosts.slots) == (2, 0.5, 16)
    assert (spec.router.max_batch_tokens, spec.router.max_wait_ms) == (4096, 1.0)


def test_yaml_and_json_files_give_the_same_spec(tmp_path: Path) -> None:
    d = _spec(dtype="bfloat16", hosts={"count": 3, "slots": 5},
              router={"max_batch_tokens": 128, "max_wait_ms": 0.5})
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(d))
    (tmp_path / "m.json").write_text(json.dumps(d))
    from_yaml, from_json = load_spec(tmp_path / "m.yaml"), load_spec(tmp_path / "m.json")
    assert from_yaml == from_json
    assert (from_yaml.hosts.count, from_yaml.hosts.slots, from_yaml.router.max_batch_tokens) == (
        3, 5, 128)


def test_spec_round_trips_through_to_dict() -> None:
    spec = ModelSpec.from_dict(_spec(moe=_moe(n_shared_experts=2, norm_topk_prob=True)))
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_omitted_sections_take_their_defaults() -> None:
    spec = ModelSpec.from_dict(_spec())
    assert spec.dtype == "float32"
    assert (spec.hosts.count, spec.hosts.slots) == (1, 64)
    m = spec.moe
    assert (m.scoring_func, m.topk_method, m.n_group, m.topk_group) == ("softmax", "greedy", 1, 1)
    assert (m.routed_scaling_factor, m.norm_topk_prob, m.n_shared_experts) == (1.0, False, 0)


def test_relative_safetensors_path_resolves_against_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    d = _spec(weights={"safetensors": "../w/model.safetensors"})
    (tmp_path / "cfg" / "m.yaml").write_text(yaml.safe_dump(d))
    spec = load_spec(tmp_path / "cfg" / "m.yaml")
    assert spec.weights.safetensors == str((tmp_path / "w" / "model.safetensors").resolve())


@pytest.mark.parametrize("alias", ["num_experts", "num_local_experts"])
def test_hf_expert_count_aliases_set_n_routed_experts(alias: str) -> None:
    d = {k: v for k, v in MOE.items() if k != "n_routed_experts"} | {alias: 12}
    assert MoEConfig.from_dict(d).n_routed_experts == 12


def test_qwen2_shared_expert_is_gated_and_sized_by_its_own_field() -> None:
    m = MoEConfig.from_dict(_moe(shared_expert_intermediate_size=40))
    assert (m.shared_intermediate_size, m.shared_expert_gate) == (40, True)
    d = MoEConfig.from_dict(_moe(n_shared_experts=2))
    assert (d.shared_intermediate_size, d.shared_expert_gate) == (192, False)


def test_top_level_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(tmp_path / "m.yaml")


# ---- refusals ------------------------------------------------------------------------------

BAD_MOE = [
    (dict(scoring_func="tanh"), "scoring_func"),
    (dict(topk_method="random"), "topk_method"),
    (dict(topk_method="noaux_tc", n_group=2, topk_group=1), "noaux_tc needs scoring_func"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "multiple of n_group"),
    (dict(topk_method="group_limited_greedy", n_group=2, topk_group=3), "topk_group"),
    (dict(n_group=0), "n_group"),
    (dict(gate_bias=True), "gate_bias"),
    (dict(hidden_sizes=64), "hidden_sizes"),
]


@pytest.mark.parametrize(("over", "field"), BAD_MOE, ids=[f for _, f in BAD_MOE])
def test_bad_moe_config_raises_spec_error_naming_the_field(over: dict, field: str) -> None:
    with pytest.raises(SpecError, match=field):
        ModelSpec.from_dict(_spec(moe=_moe(**over)))


def test_missing_moe_field_is_named() -> None:
    d = {k: v for k, v in MOE.items() if k != "num_experts_per_tok"}
    with pytest.raises(SpecError, match="num_experts_per_tok"):
        MoEConfig.from_dict(d)


BAD_SPEC = [
    (dict(colour="red"), "colour"),
    (dict(name=""), "name"),
    (dict(layers=[]), "layers"),
    (dict(layers=[1, 1]), "layers"),
    (dict(dtype="float64"), "dtype"),
    (dict(weights={}), "weights"),
    (dict(weights={"random": {"seed": 1}, "safetensors": "w.safetensors"}), "weights"),
    (dict(weights={"s3": "bucket"}), "s3"),
    (dict(hosts={"count": 0}), "hosts"),
    (dict(hosts={"gpus": 1}), "gpus"),
    (dict(router={"transport": "http"}), "router.transport"),
    (dict(router={"grpc_max_bytes": -1}), "router.grpc_max_bytes"),
    (dict(router={"max_wait_ms": -1}), "router.max_wait_ms"),
    (dict(router={"max_batch_tokens": 0}), "router.max_batch_tokens"),
    (dict(hosts=[1, 2]), "hosts"),
]


@pytest.mark.parametrize(("over", "field"), BAD_SPEC, ids=[f"{f}-{i}" for i, (_, f) in
                                                           enumerate(BAD_SPEC)])
def test_bad_spec_raises_spec_error_naming_the_field(over: dict, field: str) -> None:
    with pytest.raises(SpecError, match=field):
        ModelSpec.from_dict(_spec(**over))


def test_spec_without_moe_or_weights_is_refused() -> None:
    for missing in ("moe", "weights"):
        d = _spec()
        del d[missing]
        with pytest.raises(SpecError, match=missing):
            ModelSpec.from_dict(d)


@pytest.mark.parametrize("method", ["group_limited_greedy", "noaux_tc"])
def test_top_k_larger_than_the_experts_in_the_kept_groups_is_refused(method: str) -> None:
    # 8 experts in 4 groups of 2; keeping 1 group leaves 2 candidates for a top-4.
    func = "sigmoid" if method == "noaux_tc" else "softmax"
    with pytest.raises(SpecError, match="num_experts_per_tok"):
        MoEConfig.from_dict(_moe(num_experts_per_tok=4, topk_method=method, scoring_func=func,
                                 n_group=4, topk_group=1))


@pytest.mark.parametrize("moe", [None, "big", [1, 2]], ids=["null", "string", "list"])
def test_moe_section_that_is_not_a_mapping_raises_spec_error(moe) -> None:
    with pytest.raises(SpecError, match="moe"):
        ModelSpec.from_dict(_spec(moe=moe))


def test_wrongly_typed_moe_field_is_named() -> None:
    with pytest.raises(SpecError, match="hidden_size"):
        MoEConfig.from_dict(_moe(hidden_size="64"))


# ---- autoscaling and elastic hosts ---------------------------------------------------------

AUTOSCALING = {"enabled": True, "target_tokens_per_s": 1500.5, "min_replicas": 2, "max_replicas": 6,
               "upscale_delay_s": 0.5, "downscale_delay_s": 45.0, "smoothing": 0.25, "period_s": 2.0,
               "host_idle_s": 90.0, "rebalance_max_moves": 40, "rebalance_min_gain": 0.002,
               "consolidate_max_moves": 64, "consolidate_spare": 0.25}


def test_autoscaling_block_loads_field_for_field(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_spec(autoscaling=AUTOSCALING)))
    spec = load_spec(tmp_path / "m.yaml")
    assert spec.autoscaling == AutoscalingConfig(**AUTOSCALING)
    assert vars(spec.autoscaling) == AUTOSCALING
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_omitted_autoscaling_is_off_with_the_default_policy() -> None:
    a = ModelSpec.from_dict(_spec()).autoscaling
    assert a == AutoscalingConfig()
    assert (a.enabled, a.target_tokens_per_s, a.min_replicas, a.max_replicas) == (False, 2000.0, 1, 4)


def test_whole_numbers_are_accepted_for_float_autoscaling_fields() -> None:
    spec = ModelSpec.from_dict(_spec(autoscaling={"target_tokens_per_s": 500, "downscale_delay_s": 0}))
    a = spec.autoscaling
    assert (a.target_tokens_per_s, a.downscale_delay_s) == (500, 0)


BAD_AUTOSCALING = [
    (dict(target_tokens_per_s=0), "autoscaling.target_tokens_per_s"),
    (dict(target_tokens_per_s=float("nan")), "autoscaling.target_tokens_per_s"),
    (dict(min_replicas=0), "autoscaling.min_replicas"),
    (dict(min_replicas=3, max_replicas=2), "autoscaling.max_replicas"),
    (dict(upscale_delay_s=-1), "autoscaling.upscale_delay_s"),
    (dict(downscale_delay_s=-0.5), "autoscaling.downscale_delay_s"),
    (dict(host_idle_s=-1), "autoscaling.host_idle_s"),
    (dict(smoothing=0), "autoscaling.smoothing"),
    (dict(smoothing=1.5), "autoscaling.smoothing"),
    (dict(period_s=0), "autoscaling.period_s"),
    (dict(rebalance_max_moves=-1), "autoscaling.rebalance_max_moves"),
    (dict(rebalance_min_gain=float("nan")), "autoscaling.rebalance_min_gain"),
    (dict(rebalance_min_gain=float("inf")), "autoscaling.rebalance_min_gain must be finite"),
    (dict(enabled="yes"), "autoscaling.enabled"),
    (dict(min_replicas=1.5), "autoscaling.min_replicas"),
    (dict(max_replicas=True), "autoscaling.max_replicas"),
    (dict(target_tokens_per_s="fast"), "autoscaling.target_tokens_per_s"),
    (dict(cooldown_s=5), "cooldown_s"),
]


@pytest.mark.parametrize(("over", "field"), BAD_AUTOSCALING,
                         ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_AUTOSCALING)])
def test_bad_autoscaling_raises_spec_error_naming_the_field(over: dict, field: str) -> None:
    with pytest.raises(SpecError, match=field):
        ModelSpec.from_dict(_spec(autoscaling=over))


def test_autoscaling_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(SpecError, match="autoscaling: expected a mapping"):
        ModelSpec.from_dict(_spec(autoscaling=[1, 2]))


@pytest.mark.parametrize(("hosts", "max_count"), [({"count": 3}, 6), ({}, 2),
                                                  ({"count": 2, "max_count": 5}, 5),
                                                  ({"count": 2, "max_count": 2}, 2)])
def test_hosts_max_count_defaults_to_twice_count(hosts: dict, max_count: int) -> None:
    assert ModelSpec.from_dict(_spec(hosts=hosts)).hosts.max_count == max_count


@pytest.mark.parametrize(("hosts", "field"), [({"count": 3, "max_count": 2}, "hosts.max_count"),
                                              ({"start_timeout_s": 0}, "hosts.start_timeout_s"),
                                              ({"max_count": "4"}, "hosts.max_count")])
def test_bad_elastic_hosts_fields_are_named(hosts: dict, field: str) -> None:
    with pytest.raises(SpecError, match=field):
        ModelSpec.from_dict(_spec(hosts=hosts))


def test_hosts_resources_map_names_to_numbers() -> None:
    hosts = ModelSpec.from_dict(_spec(hosts={"resources": {"accel_a": 1, "mem_gb": 0.5}})).hosts
    assert hosts.resources == {"accel_a": 1, "mem_gb": 0.5}
    assert ModelSpec.from_dict(_spec()).hosts.resources == {}


@pytest.mark.parametrize("resources", [{"accel": "one"}, {"accel": True}, {"accel": None}, ["accel"],
                                       "accel"],
                         ids=["string", "bool", "null", "list", "name"])
def test_hosts_resources_that_are_not_numbers_by_name_are_refused(resources) -> None:
    with pytest.raises(SpecError, match="hosts.resources must map resource names to numbers"):
        ModelSpec.from_dict(_spec(hosts={"resources": resources}))


@pytest.mark.parametrize("resources", [{"accel": -1}, {"CPU": 2}, {"GPU": 1}], ids=["negative", "CPU", "GPU"])
def test_hosts_resources_ray_cannot_schedule_are_refused(resources: dict) -> None:
    with pytest.raises(SpecError, match="hosts.resources"):
        ModelSpec.from_dict(_spec(hosts={"resources": resources}))


def test_the_spec_accepts_exactly_the_dtypes_the_weights_load_in() -> None:
    assert DTYPE_NAMES == tuple(TORCH_DTYPES)
