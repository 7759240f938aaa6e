"""A real multi-node Ray cluster on this machine, run the way the README says: a head and two
workers from `ray start` (each worker offers one `moefleet_host`, one also `moefleet_router`),
`moefleet serve --address auto --detach`, answers from the Python client (through both
routers) and tritonclient checked against the in-process reference, `moefleet status`
showing hosts on two nodes, moefleet's metrics on the head's Prometheus endpoint, `moefleet
shutdown`, and each node stopped through the `ray start --block` process this test started.

Also the bad input of a cluster deployment: an address where no Ray answers, and a spec
asking for more than the cluster can ever give, each a clear error within a bounded time.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml

from moefleet.client import Client
from moefleet.testing import Reference
from tests.specs import family_spec

pytestmark = pytest.mark.e2e

_BIN = Path(sys.executable).parent
TOKEN = "cluster-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Cluster:
    """Ray nodes started with `ray start --block`: ending that process ends its node."""

    def __init__(self, temp_dir: str):
        self.temp_dir, self.nodes, self.gcs = temp_dir, [], _free_port()
        # token auth on every node and driver, as on a secured cluster, with this cluster's
        # own token (a bare machine has no ~/.ray/auth_token)
        self.env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs}"

    def start_node(self, *args: str) -> dict[str, str]:
        ports = {f"--{name}": str(_free_port()) for name in (
            "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")}
        cmd = [str(_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
               "--disable-usage-stats", *args, *(f"{k}={v}" for k, v in ports.items())]
        log = open(Path(self.temp_dir) / f"node{len(self.nodes)}.log", "w")  # noqa: SIM115
        self.nodes.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True), log))
        return ports

    def wait_for_gcs(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.gcs), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the Ray head did not come up:\n{self.logs()}")

    def wait_for_resource(self, name: str, total: float, timeout_s: float = 180) -> None:
        """Until the cluster offers `total` of `name`: every worker node has joined."""
        probe = ("import ray; ray.init(address='auto', log_to_driver=False); "
                 f"print(ray.cluster_resources().get({name!r}, 0))")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                 timeout=120, env={**self.env, "RAY_ADDRESS": self.address})
            if out.returncode == 0 and float(out.stdout.split()[-1]) >= total:
                return
            if any(proc.poll() is not None for proc, _ in self.nodes):
                break  # a node's `ray start` gave up
            time.sleep(1)
        raise RuntimeError(f"the worker nodes did not join:\n{self.logs()}")

    def stop(self) -> None:
        """End each node through the `ray start --block` process started for it (workers
        first); it ends the node's own processes."""
        for proc, log in reversed(self.nodes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the session this test started for it
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in Path(self.temp_dir).glob("node*.log"))


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="mf-", dir="/tmp")  # short: Ray's socket paths live here
    c = _Cluster(temp)
    try:
        head = c.start_node("--head", f"--port={c.gcs}", "--num-cpus=2", "--include-dashboard=false",
                            f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp}")
        c.metrics_port = int(head["--metrics-export-port"])
        c.wait_for_gcs()
        # one worker at a time: two raylets starting at once can time out on 2 cores
        c.start_node(f"--address={c.address}", "--num-cpus=1",
                     '--resources={"moefleet_host": 1, "moefleet_router": 1}')
        c.wait_for_resource("moefleet_host", 1)
        c.start_node(f"--address={c.address}", "--num-cpus=1", '--resources={"moefleet_host": 1}')
        c.wait_for_resource("moefleet_host", 2)
        yield c
    finally:
        c.stop()
        shutil.rmtree(temp, ignore_errors=True)


def _moefleet(cluster: _Cluster, *args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "MOEFLEET_TOKEN": TOKEN}
    return subprocess.run([str(_BIN / "moefleet"), *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env)


def _spec_file(tmp_path: Path, **overrides) -> tuple:
    spec = family_spec("qwen2_moe", hosts={"count": 2, "num_cpus": 0.5, "slots": 16,
                                           "resources": {"moefleet_host": 1}, **overrides},
                       router={"nodes_resource": "moefleet_router"})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    return spec, path


def test_detached_service_on_a_multi_node_cluster(cluster, tmp_path):
    spec, path = _spec_file(tmp_path)
    # port 0: the two routers share this machine's interfaces, so each takes a free port
    out = _moefleet(cluster, "serve", str(path), "--address", "auto", "--detach",
                    "--host", "127.0.0.1", "--port", "0")
    assert out.returncode == 0, out.stderr + cluster.logs()
    address = out.stdout.strip()
    try:
        out = _moefleet(cluster, "status", "--server", address, "-o", "json")
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert len({h["node_id"] for h in status["hosts"]}) == 2, "an expert host on each worker"
        routers = [r["address"] for r in status["routers"]]
        assert len(routers) == 2 and routers[0] == address  # the head's, and the worker's
        x = torch.randn(40, spec.moe.hidden_size, generator=torch.Generator().manual_seed(4))
        for router in routers:  # the serve process has exited: the service outlived it
            with Client(router) as c:
                torch.testing.assert_close(c.infer(spec.name, 3, x), Reference(spec)(3, x))
        _check_tritonclient(address, spec, x, tmp_path)
        _check_metrics(cluster.metrics_port)
    finally:
        out = _moefleet(cluster, "shutdown", "--server", address)
    assert out.returncode == 0 and "stopped" in out.stdout, out.stderr
    with Client(address, retries=0) as c, pytest.raises(grpc.RpcError) as err:
        c.ready(timeout_s=2)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _check_tritonclient(address: str, spec, x: torch.Tensor, tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", x.numpy())
    script = Path(__file__).with_name("_triton_client.py")
    out = subprocess.run([sys.executable, str(script), address, spec.name, "3", "FP32",
                          str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    y = torch.from_numpy(np.load(tmp_path / "out.npy"))
    torch.testing.assert_close(y, Reference(spec)(3, x))


def _check_metrics(port: int, timeout_s: float = 60) -> None:
    """moefleet's metrics appear in Ray's Prometheus export of the head node (where the
    Controller and the head router run); Ray reports them every few seconds."""
    want = ("ray_moefleet_expert_tokens_per_s", "ray_moefleet_expert_replicas",
            "ray_moefleet_host_slots_used", "ray_moefleet_request_latency_s_bucket")
    deadline, text = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            text = ""
        if all(name in text for name in want):
            return
        time.sleep(2)
    missing = [name for name in want if name not in text]
    raise AssertionError(f"metrics missing from the head's Prometheus export: {missing}")


def test_an_address_where_no_ray_answers_is_a_clear_error(cluster, tmp_path):
    _, path = _spec_file(tmp_path)
    t0 = time.monotonic()
    out = _moefleet(cluster, "serve", str(path), "--address", f"127.0.0.1:{_free_port()}",
                    "--detach", timeout_s=60)
    assert out.returncode == 1 and "no Ray cluster answers" in out.stderr, out.stderr
    assert time.monotonic() - t0 < 30


def test_a_spec_the_cluster_can_never_hold_fails_clearly_and_leaves_nothing(cluster, tmp_path):
    _, path = _spec_file(tmp_path, num_gpus=4, start_timeout_s=5)
    out = _moefleet(cluster, "serve", str(path), "--address", "auto", "--detach",
                    "--port", str(_free_port()), timeout_s=120)
    assert out.returncode == 1, out.stderr
    assert "did not start within 5s" in out.stderr and "'GPU': 4" in out.stderr, out.stderr
    # nothing is left behind: a good spec starts right after on the same cluster
    _, good = _spec_file(tmp_path)
    port = _free_port()
    out = _moefleet(cluster, "serve", str(good), "--address", "auto", "--detach",
                    "--host", "127.0.0.1", "--port", str(port))
    assert out.returncode == 0, out.stderr
    assert _moefleet(cluster, "shutdown", "--server", f"127.0.0.1:{port}").returncode == 0
