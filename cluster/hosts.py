"""Expert host actors on Ray: the ExpertHost class as it runs there, and how one is started.

A host asks for what `hosts:` in the spec says (GPUs, CPUs, and the custom resources a
cluster file offers), so a pending host is the resource demand that makes a `ray up`
cluster's autoscaler add a node. Starting waits a bounded time and then says what is missing;
on a cluster that cannot add nodes (no autoscaler), `no_room` says so before anything starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Container
from typing import Any

import ray

from moefleet.core.errors import ResourceExhausted
from moefleet.experts import dataplane
from moefleet.experts.host import ExpertHost

from .spec import HostsConfig

__all__ = ["RayExpertHost", "start_host", "no_room", "host_name", "end_orphans"]

log = logging.getLogger(__name__)
NAMESPACE = "moefleet"

LOADS = "load"  # the concurrency group of weight loads: a thread of their own

def host_name(model: str, index: int) -> str:
    """The actor name (and host id) of model's index-th host."""
    return f"{model}-host-{index}"


def end_orphans(model: str, next_host: int, known: Container[str]) -> None:
    """End the hosts of `model` numbered below next_host that are not `known`: started by an
    earlier incarnation of the Controller that died before the host was up (they hold no
    published replica)."""
    for i in range(next_host):
        host_id = host_name(model, i)
        if host_id in known:
            continue
        try:
            ray.kill(ray.get_actor(host_id, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            continue  # none by that name (ended, or never started)
        log.warning("ended expert host %s, started before a restart and not journalled", host_id)


class RayExpertHost(ExpertHost):
    """ExpertHost as it runs in Ray: it also says which node it is on, and has a thread for
    weight loads (concurrency group `LOADS`: the executor sends each load there), so requests
    do not queue behind a load. A load writes only a slot no published version routes to yet.

    Given the service's data-plane secret, it also serves `compute` on a gRPC data-plane port
    of the node's own IP (experts/dataplane.py); `info()["dataplane"]` is its HOST:PORT."""

    def __init__(self, *args: Any, dataplane_secret: str = "", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._dataplane, self._dataplane_address = None, ""
        if dataplane_secret:
            self._dataplane, self._dataplane_address = dataplane.serve(
                self.compute, ray.util.get_node_ip_address(), dataplane_secret)

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {**super().info(), "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "dataplane": self._dataplane_address}


def no_room(hc: HostsConfig) -> str | None:
    """Why a host of `hc` cannot start now, or None when it may: no live node has its resources
    free and Ray's autoscaler cannot add one. Without an autoscaler config (the embedded local
    Ray, nodes started by hand) Ray's monitor runs read-only and names each node's type after
    the node itself; then the cluster is as large as it gets. None too when the state is unknown.
    """
    from ray.autoscaler.v2.sdk import get_cluster_status

    want = {"CPU": hc.num_cpus, "GPU": hc.num_gpus, **hc.resources}
    try:
        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        nodes = [*status.active_nodes, *status.idle_nodes]
    except Exception:  # an older or unreachable autoscaler state: fall back to waiting
        return None
    if not nodes or any(n.ray_node_type_name != f"node_{n.node_id}" for n in nodes):
        return None
    free = [{u.resource_name: u.total - u.used for u in n.resource_usage.usage} for n in nodes]
    if any(all(f.get(r, 0.0) >= v - 1e-9 for r, v in want.items() if v > 0) for f in free):
        return None
    most = {r: max(f.get(r, 0.0) for f in free) for r, v in want.items() if v > 0}
    return (f"a new expert host needs {want}, no node has that free (the most free on one node: "
            f"{most}), and this Ray cluster cannot add nodes (it has no autoscaler)")


async def start_host(host_id: str, hc: HostsConfig, timeout_s: float,
                     dataplane_secret: str = "") -> tuple[Any, dict[str, Any]]:
    """Start one named host actor and wait until it answers; (handle, info). With a
    `dataplane_secret` it also serves the gRPC data plane, refusing calls without that secret.

    Hosts are detached: the Controller starts them, and they must outlive a restart of the
    Controller (an owned actor dies with its owner). The Controller ends them on shutdown.
    """
    handle = ray.remote(concurrency_groups={LOADS: 1})(RayExpertHost).options(
        name=host_id, namespace=NAMESPACE, num_cpus=hc.num_cpus, num_gpus=hc.num_gpus,
        resources=dict(hc.resources), lifetime="detached",
    ).remote(host_id=host_id, num_slots=hc.slots, num_cpus=hc.num_cpus, device="auto",
             kernel_backend=hc.kernel_backend, dataplane_secret=dataplane_secret)
    try:
        info = await asyncio.wait_for(handle.info.remote(), timeout_s)
    except asyncio.TimeoutError:
        ray.kill(handle)
        want = {"CPU": hc.num_cpus, "GPU": hc.num_gpus, **hc.resources}
        raise ResourceExhausted(
            f"expert host {host_id} did not start within {timeout_s:.0f}s: the cluster has no "
            f"node free with {want} (available now: {ray.available_resources()})") from None
    return handle, info
