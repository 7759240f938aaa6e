"""Expert host actors on Ray: the ExpertHost class as it runs there, and how one is started.

A host asks for what `hosts:` in the spec says (GPUs, CPUs, and the custom resources a
cluster file offers), so a pending host is the resource demand that makes a `ray up`
cluster's autoscaler add a node. Starting waits a bounded time and then says what is missing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from moefleet.experts.host import ExpertHost
from moefleet.router.errors import ResourceExhausted

from .spec import HostsConfig

__all__ = ["RayExpertHost", "start_host"]

NAMESPACE = "moefleet"


class RayExpertHost(ExpertHost):
    """ExpertHost as it runs in Ray: it also says which node it is on."""

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {**super().info(), "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address()}


async def start_host(host_id: str, hc: HostsConfig, timeout_s: float) -> tuple[Any, dict[str, Any]]:
    """Start one named host actor and wait until it answers; (handle, info).

    Hosts are detached: the Controller starts them, and they must outlive a restart of the
    Controller (an owned actor dies with its owner). The Controller ends them on shutdown.
    """
    handle = ray.remote(RayExpertHost).options(
        name=host_id, namespace=NAMESPACE, num_cpus=hc.num_cpus, num_gpus=hc.num_gpus,
        resources=dict(hc.resources), lifetime="detached",
    ).remote(host_id, hc.slots, hc.num_cpus, "auto", hc.kernel_backend)
    try:
        info = await asyncio.wait_for(handle.info.remote(), timeout_s)
    except asyncio.TimeoutError:
        ray.kill(handle)
        want = {"CPU": hc.num_cpus, "GPU": hc.num_gpus, **hc.resources}
        raise ResourceExhausted(
            f"expert host {host_id} did not start within {timeout_s:.0f}s: the cluster has no "
            f"node free with {want} (available now: {ray.available_resources()})") from None
    return handle, info
