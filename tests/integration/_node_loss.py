"""Runs in a child interpreter (it needs a Ray of its own, not the test session's): a
`ray.cluster_utils.Cluster` with a head and two worker nodes offering `moefleet_host`, a
moefleet service on it under load, then the worker node holding an expert host is removed.

Prints one JSON line: answers and their checks, error codes seen, how long until every
request succeeded again, and the hosts before and after.

    python _node_loss.py
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import grpc
import ray
import torch
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.*

from moefleet.client import Client  # noqa: E402
from moefleet.cluster import service  # noqa: E402
from moefleet.testing import Reference  # noqa: E402
from tests.specs import family_spec  # noqa: E402


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    workers = [cluster.add_node(num_cpus=1, resources={"moefleet_host": 2}) for _ in range(2)]
    try:
        ray.init(address=cluster.address, namespace=service.NAMESPACE, log_to_driver=False)
        cluster.wait_for_nodes()
        print(json.dumps(run(cluster, workers)))
    finally:
        ray.shutdown()
        cluster.shutdown()


def run(cluster: Cluster, workers: list) -> dict:
    spec = family_spec("mixtral", hosts={"count": 2, "num_cpus": 0.25, "slots": 16,
                                         "resources": {"moefleet_host": 1}})
    svc = service.start(spec, port=0)
    ref, stop = Reference(spec), threading.Event()
    answers, codes, last_error = [], [], [0.0, ""]
    with Client(svc.address, retries=100) as c:  # retries UNAVAILABLE within each deadline
        before = {h.id: h.node_id for h in c.status().hosts}

        def load(seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            while not stop.is_set():
                x = torch.randn(32, spec.moe.hidden_size, generator=g)
                try:
                    y, version = c.infer_with_version(spec.name, 1, x, timeout_s=10)
                    answers.append(torch.allclose(y, ref(1, x), rtol=1.3e-6, atol=1e-5))
                except grpc.RpcError as e:
                    codes.append(e.code().name)
                    last_error[:] = [time.monotonic(), e.details()]

        threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        victim = next((w for w in workers if w.node_id in before.values()), None)
        if victim is None:
            stop.set()
            raise RuntimeError(f"no expert host on a worker node: {before}, "
                               f"workers {[w.node_id for w in workers]}")
        lost = [h for h, node in before.items() if node == victim.node_id]
        t_loss = time.monotonic()
        cluster.remove_node(victim)
        restored = served_s = None
        deadline = t_loss + 90
        while time.monotonic() < deadline:  # every expert served from a live node, no errors
            (m,) = c.status(spec.name).models
            nodes = {h.id: h.node_id for h in c.status().hosts}
            served = all(e.replicas and all(nodes.get(r.host) not in (None, victim.node_id)
                                            for r in e.replicas)
                         for layer in m.layers for e in layer.experts)
            if served and served_s is None:
                served_s = time.monotonic() - t_loss
            if served and time.monotonic() - max(last_error[0], t_loss) > 3.0:
                restored = time.monotonic() - t_loss
                break
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
        after = {h.id: h.node_id for h in c.status().hosts}
    svc.shutdown()
    return {"answers": len(answers), "wrong": answers.count(False), "codes": sorted(set(codes)),
            "errors": len(codes), "last_error": last_error[1], "lost_hosts": lost, "restored_s": restored,
            "served_s": served_s,
            "hosts_before": before, "hosts_after": after, "removed_node": victim.node_id}


if __name__ == "__main__":
    main()
