"""deploy/: the `ray up` cluster files, the example cluster spec and the Grafana dashboard agree
with Ray, with each other and with the metrics moefleet exports.

Cluster files are checked by Ray's own code, on the path `ray up` takes, minus the cloud.
`ray up` runs `commands._bootstrap_config`, which does:
  1. `ray.autoscaler._private.util.prepare_config`: merges the provider's defaults.yaml
     (`fillout_defaults`), merges setup commands, checks docker, fills min/max workers; for
     `provider.type: local` it builds the single local node type (`prepare_local`);
  2. the provider's `fillout_available_node_types_resources`: for AWS an EC2 query that fills
     CPU/GPU where a node type leaves `resources` out;
  3. `ray.autoscaler._private.util.validate_config`: jsonschema against
     `ray/autoscaler/ray-schema.json`, then the head-type and min/max_workers checks;
  4. the provider's `bootstrap_config`: for AWS, boto3 calls (IAM, key pair, subnets, security
     groups, AMI).
Steps 1 and 3 are pure and run here, on the files as they are; steps 2 and 4 talk to AWS and
are left out. Leaving out step 2 changes nothing because every AWS node type declares its
resources (a test below insists on it). The sockets are blocked while Ray's code runs, so a
future Ray that reached for the network would fail the test rather than contact AWS.

Metric names follow Ray's Prometheus export: `ray_` + the name given to ray.util.metrics
(`NAMESPACE` in Ray's metric recorder), and a histogram's series end in _bucket/_count/_sum.
The names and tags come from cluster/metrics.py and router/metrics.py, read as source (no Ray is started).
"""

from __future__ import annotations

import ast
import copy
import json
import re
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray._private.telemetry.open_telemetry_metric_recorder import NAMESPACE as RAY_METRIC_NAMESPACE
from ray.autoscaler._private.util import prepare_config, validate_config

from moefleet.cluster.spec import ModelSpec, load_spec

pytestmark = pytest.mark.integration  # Ray's own validators; no cluster is started

REPO = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO / "deploy/cluster"
CLUSTER_FILES = sorted(CLUSTER_DIR.glob("*.yaml"))
AWS_FILES = [p for p in CLUSTER_FILES if p.name.startswith("aws-")]
SPEC = REPO / "deploy/examples/cluster-spec.yaml"
DASHBOARD = REPO / "deploy/grafana/moefleet.json"
METRICS_PY = (REPO / "cluster/metrics.py", REPO / "router/metrics.py")

HOST_RESOURCE = "moefleet_host"
_RESOURCES_FLAG = re.compile(r"--resources='(\{[^']*\})'")


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def _raw(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a name or open a connection fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _ray_checked(raw: dict[str, Any]) -> dict[str, Any]:
    """Steps 1 and 3 of `ray up` (see the module docstring); returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def _start_resources(commands: list[str]) -> dict[str, float]:
    """Custom resources a list of start commands passes to `ray start --resources='{...}'`."""
    found: dict[str, float] = {}
    for cmd in commands:
        for m in _RESOURCES_FLAG.finditer(cmd):
            found.update(json.loads(m.group(1)))
    return found


def _node_types(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(head, {worker type: entry}); each entry has `resources`, `min_workers`, `max_workers`.

    A local (on-prem) file has no node types: its one type's resources are what `ray start`
    announces, and every listed worker joins (min = max = len(worker_ips)).
    """
    if raw["provider"]["type"] == "local":
        n = len(raw["provider"]["worker_ips"])
        head = {"resources": _start_resources(raw["head_start_ray_commands"])}
        worker = {"resources": _start_resources(raw["worker_start_ray_commands"]),
                  "min_workers": n, "max_workers": raw.get("max_workers", n)}
        return head, {"worker": worker}
    types = raw["available_node_types"]
    head_name = raw["head_node_type"]
    return types[head_name], {k: v for k, v in types.items() if k != head_name}


def _host_workers(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in _node_types(raw)[1].items() if v["resources"].get(HOST_RESOURCE, 0) >= 1}


# ---- the cluster files pass Ray's own validation ---------------------------------------------


def test_the_three_cluster_files_exist() -> None:
    assert {"local.yaml", "aws-gpu.yaml", "aws-cpu.yaml"} <= set(_ids(CLUSTER_FILES))


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids(CLUSTER_FILES))
def test_cluster_file_passes_ray_prepare_and_validate_config(path: Path, no_network) -> None:
    raw = _raw(path)
    prepared = _ray_checked(raw)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["cluster_name"] == raw["cluster_name"]
    for entry in prepared["available_node_types"].values():
        assert 0 <= entry["min_workers"] <= entry["max_workers"] <= prepared["max_workers"]


@pytest.mark.parametrize("path", AWS_FILES, ids=_ids(AWS_FILES))
def test_ray_validation_rejects_broken_variants_of_the_file(path: Path, no_network) -> None:
    """The check above bites: the same file with one mistake is refused."""
    raw = _raw(path)
    worker = next(iter(_host_workers(raw)))

    fractional = copy.deepcopy(raw)
    fractional["available_node_types"][worker]["resources"]["CPU"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        _ray_checked(fractional)

    unknown = {**copy.deepcopy(raw), "max_worker": 3}
    with pytest.raises(jsonschema.ValidationError):
        _ray_checked(unknown)

    too_many = copy.deepcopy(raw)
    too_many["available_node_types"][worker]["min_workers"] = raw["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        _ray_checked(too_many)


@pytest.mark.parametrize("path", AWS_FILES, ids=_ids(AWS_FILES))
def test_aws_node_types_declare_resources_so_no_ec2_lookup_is_needed(path: Path) -> None:
    for name, entry in _raw(path)["available_node_types"].items():
        assert entry["resources"].get("CPU", 0) >= 1, name


# ---- who offers moefleet_host ---------------------------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids(CLUSTER_FILES))
def test_workers_offer_moefleet_host_and_the_head_does_not(path: Path) -> None:
    head, workers = _node_types(_raw(path))
    assert head["resources"].get(HOST_RESOURCE, 0) == 0
    assert _host_workers(_raw(path)), f"no worker type offers {HOST_RESOURCE}"


def test_local_workers_announce_moefleet_host_in_ray_start() -> None:
    raw = _raw(CLUSTER_DIR / "local.yaml")
    assert _start_resources(raw["worker_start_ray_commands"])[HOST_RESOURCE] >= 1
    assert all(c.startswith(("ray ", "ulimit")) for c in raw["worker_start_ray_commands"])


def test_aws_gpu_worker_type_has_gpus_bounds_and_an_idle_timeout() -> None:
    raw = _raw(CLUSTER_DIR / "aws-gpu.yaml")
    gpu_types = {k: v for k, v in _host_workers(raw).items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type offers moefleet_host"
    for name, entry in gpu_types.items():
        assert 0 <= entry["min_workers"] <= entry["max_workers"], name
        # one GPU per expert host on the GPU cluster (hosts.num_gpus: 1)
        assert entry["resources"][HOST_RESOURCE] <= entry["resources"]["GPU"], name
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert raw["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("path", AWS_FILES, ids=_ids(AWS_FILES))
def test_aws_file_sets_its_own_idle_timeout_and_worker_bounds(path: Path) -> None:
    raw = _raw(path)
    assert raw["idle_timeout_minutes"] > 0  # in the file, not Ray's default
    for name, entry in _host_workers(raw).items():
        assert {"min_workers", "max_workers"} <= set(entry), name


# ---- what ray up copies and installs --------------------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids(CLUSTER_FILES))
def test_file_mounts_copy_the_repository_and_setup_installs_it(path: Path) -> None:
    """`ray up` (run from the repository root) asserts each mount's local path exists."""
    raw = _raw(path)
    for remote, local in raw["file_mounts"].items():
        assert (REPO / local).exists(), f"{remote}: {local} does not exist under the repository"
    assert (REPO / raw["file_mounts"]["~/moefleet"] / "pyproject.toml").is_file()
    commands = " ".join(raw["setup_commands"] + raw.get("head_setup_commands", [])
                        + raw.get("worker_setup_commands", []))
    assert "torch==2.13.0" in commands
    assert re.search(r"pip install [^;&]*-e [\"']?(~|\$HOME)/moefleet", commands)


# ---- the example cluster spec ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_spec() -> ModelSpec:
    return load_spec(SPEC)


def test_cluster_spec_loads_cpu_safe_with_autoscaling_on(cluster_spec: ModelSpec) -> None:
    h = cluster_spec.hosts
    assert (h.count, h.num_cpus, h.num_gpus, h.slots, h.max_count) == (2, 2, 0, 32, 8)
    assert h.resources == {HOST_RESOURCE: 1}
    assert cluster_spec.autoscaling.enabled
    assert cluster_spec.weights.random is not None  # runs without a checkpoint
    # every expert gets its first replica on the starting hosts, with slots to spare
    assert len(cluster_spec.layers) * cluster_spec.moe.n_routed_experts < h.count * h.slots


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_ids(CLUSTER_FILES))
def test_cluster_spec_hosts_ask_for_what_the_workers_offer(path: Path, cluster_spec: ModelSpec) -> None:
    h = cluster_spec.hosts
    head, _ = _node_types(_raw(path))
    workers = _host_workers(_raw(path))
    for name in h.resources:
        assert head["resources"].get(name, 0) == 0, f"the head offers {name}: hosts could land there"
        assert all(w["resources"].get(name, 0) >= h.resources[name] for w in workers.values()), name


@pytest.mark.parametrize("path", AWS_FILES, ids=_ids(AWS_FILES))
def test_aws_workers_fit_the_spec_hosts_from_count_up_to_max_count(path: Path,
                                                                  cluster_spec: ModelSpec) -> None:
    h = cluster_spec.hosts
    workers = _host_workers(_raw(path))
    per_node = {k: int(w["resources"][HOST_RESOURCE] // h.resources[HOST_RESOURCE])
                for k, w in workers.items()}
    for k, w in workers.items():
        assert w["resources"]["CPU"] >= per_node[k] * h.num_cpus, k
    # the starting hosts need no new node; max_count hosts fit at full scale
    assert sum(per_node[k] * w["min_workers"] for k, w in workers.items()) >= h.count
    assert sum(per_node[k] * w["max_workers"] for k, w in workers.items()) >= h.max_count


# ---- the Grafana dashboard ------------------------------------------------------------------


def _moefleet_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """{name: (kind, tag keys)} of every ray.util.metrics object built in the metrics modules
    (the Controller's and the router's)."""
    found = {}
    for path in METRICS_PY:
        found.update(_metrics_in(ast.parse(path.read_text())))
    return found


def _metrics_in(tree: ast.Module) -> dict[str, tuple[str, tuple[str, ...]]]:
    consts: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass

    def value(node: ast.expr) -> Any:
        return consts[node.id] if isinstance(node, ast.Name) else ast.literal_eval(node)

    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("Gauge", "Histogram", "Counter")):
            kw = {k.arg: k.value for k in node.keywords}
            tags = kw.get("tag_keys", node.args[2] if len(node.args) > 2 else None)
            found[value(node.args[0])] = (node.func.attr, tuple(value(tags)) if tags else ())
    return found


def _exported_series() -> dict[str, set[str]]:
    """Prometheus series name -> the labels moefleet sets on it."""
    series = {}
    for name, (kind, tags) in _moefleet_metrics().items():
        full = f"{RAY_METRIC_NAMESPACE}_{name}"
        if kind == "Histogram":
            series[f"{full}_bucket"] = {*tags, "le"}
            series[f"{full}_count"] = set(tags)
            series[f"{full}_sum"] = set(tags)
        else:
            series[full] = set(tags)
    return series


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _variable_queries(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def test_metrics_py_defines_the_metrics_the_dashboard_is_built_on() -> None:
    assert _moefleet_metrics() == {
        "moefleet_expert_tokens_per_s": ("Gauge", ("model", "layer", "expert")),
        "moefleet_expert_replicas": ("Gauge", ("model", "layer", "expert")),
        "moefleet_routing_version": ("Gauge", ("model",)),
        "moefleet_host_slots_used": ("Gauge", ("host",)),
        "moefleet_host_slots_total": ("Gauge", ("host",)),
        "moefleet_request_latency_s": ("Histogram", ("model",)),
        "moefleet_unplaced_replicas": ("Gauge", ("model",)),
    }
    assert RAY_METRIC_NAMESPACE == "ray"


def test_dashboard_templating_has_a_prometheus_datasource_and_a_model_variable(dashboard) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query"
    assert model["datasource"]["uid"] == "${datasource}"
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == "label_values(ray_moefleet_routing_version, model)"
    assert 36 <= dashboard["schemaVersion"] <= 41


def test_every_dashboard_query_uses_the_datasource_variable(dashboard) -> None:
    for p in dashboard["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_dashboard_exprs_name_only_exported_moefleet_series_and_their_labels(dashboard) -> None:
    series = _exported_series()
    for expr in _panel_exprs(dashboard) + _variable_queries(dashboard):
        used = re.findall(r"\b(ray_moefleet_\w+)", expr)
        assert used, f"no moefleet metric in {expr!r}"
        unknown = set(used) - set(series)
        assert not unknown, f"{expr!r}: {sorted(unknown)} not exported by the metrics modules"
        assert not re.search(r"(?<!ray_)\bmoefleet_\w+\s*[{(\[)]", expr), f"missing ray_ prefix: {expr!r}"
        for name, body in re.findall(r"\b(ray_moefleet_\w+)\{([^}]*)\}", expr):
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body))
            assert labels <= series[name], f"{expr!r}: {name} has no label(s) {labels - series[name]}"
        allowed = set().union(*(series[n] for n in used))
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            labels = {s.strip() for s in group.split(",")}
            assert labels <= allowed, f"{expr!r}: grouping by {labels - allowed}"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_dashboard_charts_every_metric_and_latency_p50_and_p99(dashboard) -> None:
    exprs = _panel_exprs(dashboard)
    text = "\n".join(exprs)
    for name in _moefleet_metrics():
        assert f"ray_{name}" in text, name
    bucket = "ray_moefleet_request_latency_s_bucket"
    for q in ("0.5", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q},") and bucket in e and "by (le)" in e
                   for e in exprs), q
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Tokens / s per expert", "Replicas per expert", "Request latency p50 / p99",
            "Host slot use", "Routing version"} <= titles
