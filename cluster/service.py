"""Bringing the service up and down on Ray: the executor of the initial plan.

    start(spec)  ray.init (embedded local Ray, `auto`, or `ray://`) → Controller (named,
                 detached) → ExpertHost actors → weights into slots (each host reads or makes
                 its own experts) → replicas registered → table published → Router listening

Only this module and the actors have effects; what goes where is `placement`'s decision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray

from moefleet.experts.host import ExpertHost
from moefleet.router.actor import Router

from .controller import Controller
from .model import gate_of, source_args, source_of
from .placement import initial_placement
from .spec import ModelSpec

__all__ = ["Service", "start", "connect_ray", "NAMESPACE", "CONTROLLER_NAME"]

log = logging.getLogger(__name__)
NAMESPACE = "moefleet"
CONTROLLER_NAME = "moefleet-controller"


@dataclass
class Service:
    """A running service: its actors and the address its gRPC server listens on."""

    controller: Any
    routers: list[Any]
    hosts: list[Any]
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop the routers (draining in-flight requests), then end every actor."""
        ray.get([r.stop.remote(grace_s) for r in self.routers])
        for actor in [*self.routers, *self.hosts, self.controller]:
            ray.kill(actor)


def connect_ray(address: str = "local", num_cpus: int | None = None) -> None:
    """`local` starts an embedded Ray; `auto` or `ray://…` joins an existing cluster."""
    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False}
    if address == "local":
        # address="local" starts a new instance even when RAY_ADDRESS names another cluster
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kw)
    else:
        ray.init(address=address, **kw)


def start(spec: ModelSpec, port: int = 50051, host: str = "127.0.0.1",
          detached: bool = False) -> Service:
    """Start everything for one model spec on the connected Ray cluster."""
    lifetime = "detached" if detached else None
    controller = _start_controller()
    hosts = _start_hosts(spec, lifetime)
    _load_experts(spec, controller, hosts)
    router = ray.remote(Router).options(
        num_cpus=spec.router.num_cpus, num_gpus=spec.router.num_gpus, lifetime=lifetime,
        max_concurrency=1000,
    ).remote(controller, spec.router)
    bound = ray.get(router.start.remote(host, port))
    log.info("moefleet serving %s on %s:%d", spec.name, host, bound)
    return Service(controller, [router], [h for _, h in hosts], host, bound)


def _start_controller() -> Any:
    """The named, detached Controller; one per Ray cluster (namespace)."""
    try:
        return ray.remote(Controller).options(
            name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
            num_cpus=0,
        ).remote()
    except ValueError as e:  # the name is taken
        raise RuntimeError(
            f"a moefleet service already runs on this Ray cluster (actor {CONTROLLER_NAME!r} "
            f"in namespace {NAMESPACE!r}); shut it down first"
        ) from e


def _start_hosts(spec: ModelSpec, lifetime: str | None) -> list[tuple[str, Any]]:
    hc = spec.hosts
    actor = ray.remote(_RayExpertHost)
    hosts = []
    for i in range(hc.count):
        host_id = f"{spec.name}-host-{i}"
        handle = actor.options(
            num_cpus=hc.num_cpus, num_gpus=hc.num_gpus, lifetime=lifetime, name=host_id,
            namespace=NAMESPACE,
        ).remote(host_id, hc.slots, hc.num_cpus, "auto", hc.kernel_backend)
        hosts.append((host_id, handle))
    return hosts


def _load_experts(spec: ModelSpec, controller: Any, hosts: list[tuple[str, Any]]) -> None:
    """Every host loads its experts (in parallel), then the Controller learns of the ready
    slots, the gates and shared experts, and publishes version 1."""
    infos = ray.get([h.info.remote() for _, h in hosts])
    placement = initial_placement(spec.layers, spec.moe.n_routed_experts, [i["slots_total"] for i in infos])
    src = source_args(spec)
    loads = [hosts[h][1].load_source.remote(slot, layer, e, src)
             for (layer, e), reps in placement.items() for h, slot in reps]
    ray.get(loads)
    weights = source_of(spec)
    layers = {L: {"gate": gate_of(spec, L), "shared": weights.shared(L)} for L in spec.layers}
    ray.get(controller.add_model.remote(spec, layers))
    for (host_id, handle), info in zip(hosts, infos, strict=True):
        ray.get(controller.add_host.remote(host_id, handle, info))
    for (layer, e), reps in placement.items():
        for h, slot in reps:
            controller.add_replica.remote(spec.name, layer, e, hosts[h][0], slot)
    ray.get(controller.publish.remote(spec.name))


class _RayExpertHost(ExpertHost):
    """ExpertHost as it runs in Ray: it also says which node it is on."""

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {**super().info(), "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address()}
