"""The Serve config (deploy/serve/moefleet.yaml) and the KubeRay RayService carry one and the
same application, valid for Ray Serve's own schema, whose args moefleet's builder accepts; the
RayService's workers offer what the spec's expert hosts ask for."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deploy.serve.app import ServeArgs, fingerprint
from moefleet.cluster.spec import ModelSpec
from moefleet.core.config import SpecError

pytestmark = pytest.mark.integration  # Ray's own validators; no cluster is started

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "deploy/serve/moefleet.yaml"
RAYSERVICE = ROOT / "deploy/kuberay/rayservice.yaml"


def _serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def _app() -> dict:
    (app,) = _serve_config()["applications"]
    return app


def _cluster() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())["spec"]["rayClusterConfig"]


def _offered(group: dict) -> dict[str, float]:
    """Custom resources a group offers: KubeRay's `rayStartParams.resources` is quoted JSON."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


# ---- the Serve config ---------------------------------------------------------------------------


def test_serve_config_is_valid_for_serve_schema():
    config = ServeDeploySchema.model_validate(_serve_config())
    (app,) = config.applications
    assert (app.name, app.route_prefix) == ("moefleet", "/moefleet")


def test_inline_spec_loads_as_a_model_spec_and_the_builder_takes_the_args():
    args = ServeArgs.from_dict(_app()["args"])
    assert args.spec == ModelSpec.from_dict(_app()["args"]["spec"])
    assert (args.port, args.host, args.token) == (50051, "0.0.0.0", None)


def test_import_path_names_the_builder_in_deploy_serve():
    module, attr = _app()["import_path"].split(":")
    mod = importlib.import_module(module)  # as installed: where `serve deploy` imports it
    assert Path(mod.__file__).resolve() == ROOT / "deploy/serve/app.py"
    assert callable(getattr(mod, attr))


# ---- the KubeRay RayService ---------------------------------------------------------------------


def test_rayservice_carries_the_same_applications_as_the_serve_config():
    v2 = yaml.safe_load(yaml.safe_load(RAYSERVICE.read_text())["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(v2)
    assert v2["applications"] == _serve_config()["applications"]


def test_gpu_workers_offer_what_expert_hosts_ask_for_and_the_head_does_not():
    hosts = ServeArgs.from_dict(_app()["args"]).spec.hosts
    cluster = _cluster()
    assert "moefleet_host" in hosts.resources and hosts.num_gpus >= 1
    assert not _offered(cluster["headGroupSpec"]) & hosts.resources.keys()
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    offered = _offered(group)
    per_worker = min(offered[k] // v for k, v in hosts.resources.items())
    assert per_worker >= 1 and per_worker * hosts.num_gpus <= gpus
    assert group["replicas"] * per_worker >= hosts.count
    assert group["maxReplicas"] * per_worker >= hosts.max_count


def test_head_exposes_moefleet_grpc_port():
    (container,) = _cluster()["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["containerPort"]: p["name"] for p in container["ports"]}
    assert ports[_app()["args"]["port"]] == "moefleet-grpc"
    assert ports[8000] == "serve"  # KubeRay's serve Service and the status route need it


# ---- the builder's args -------------------------------------------------------------------------


def test_args_need_exactly_one_spec_and_only_known_names():
    spec = _app()["args"]["spec"]
    with pytest.raises(ValueError, match="unknown"):
        ServeArgs.from_dict({"spec": spec, "prot": 1})
    with pytest.raises(ValueError, match="exactly one"):
        ServeArgs.from_dict({"port": 1})
    with pytest.raises(ValueError, match="exactly one"):
        ServeArgs.from_dict({"spec": spec, "spec_path": "x.yaml"})
    with pytest.raises(SpecError, match="moe.n_group"):
        ServeArgs.from_dict({"spec": {**spec, "moe": {**spec["moe"], "n_group": 0}}})


def test_spec_path_loads_the_same_spec_as_inline(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_app()["args"]["spec"]))
    assert ServeArgs.from_dict({"spec_path": str(path)}).spec == ServeArgs.from_dict(_app()["args"]).spec


def test_fingerprint_changes_with_spec_port_host_and_token_only():
    args = ServeArgs.from_dict(_app()["args"])
    same = ServeArgs.from_dict(_app()["args"])
    assert fingerprint(args, "t") == fingerprint(same, "t")
    other_spec = dataclasses.replace(args, spec=dataclasses.replace(args.spec, name="other"))
    others = [other_spec, dataclasses.replace(args, port=1), dataclasses.replace(args, host="h")]
    prints = {fingerprint(args, "t"), fingerprint(args, "u"), *(fingerprint(a, "t") for a in others)}
    assert len(prints) == 5
