"""Bringing the service up and down on Ray.

    start(spec)  ray.init (embedded local Ray, `auto`, or `ray://`) → Controller (named,
                 detached, journalled) → Controller.deploy: hosts, one replica of every
                 expert, version 1 → Router (named) listening, registered with the Controller

Only this module and the actors have effects; what goes where is `placement`'s decision.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from moefleet.router.actor import Router
from moefleet.router.server import TlsConfig

from .admin import admin_service
from .controller import Controller
from .hosts import NAMESPACE
from .spec import ModelSpec

__all__ = ["Service", "start", "connect_ray", "check_exposure", "is_loopback", "NAMESPACE",
           "CONTROLLER_NAME", "ROUTER_NAME"]

log = logging.getLogger(__name__)
CONTROLLER_NAME = "moefleet-controller"
# The Controller and the router live on the head node (where clients and `ray exec` arrive);
# expert hosts go wherever their resources are.
_ON_HEAD = {"node:__internal_head__": 0.001}
ROUTER_NAME = "moefleet-router-{}"
_PROGRESS_PERIOD_S = 0.25
_WATCH_PERIOD_S = 0.5


@dataclass
class Service:
    """A running service: its actors and the address its gRPC server listens on."""

    controller: Any
    routers: list[Any]
    host: str  # the head router's address: where the service is usually called
    port: int
    addresses: list[str] = field(default_factory=list)  # every router's HOST:PORT

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def hosts(self) -> dict[str, Any]:
        """The expert hosts now, by id (they change as the service scales)."""
        return ray.get(self.controller.hosts.remote())

    def watch(self, stop: Callable[[], bool]) -> str | None:
        """Block until `stop()` says so (None), an admin Shutdown ("stopped ..."), or the
        service is gone for good (why), looking every half second."""
        stopping = self.controller.wait_stopping.remote()  # Ray carries it over a restart
        while not stop():
            try:
                done, _ = ray.wait([stopping], timeout=_WATCH_PERIOD_S)
                if done:
                    ray.get(stopping)
                    return "stopped by an admin Shutdown call"
                if not any(_alive(self.routers)):
                    return "every router is gone and cannot be restarted"
            except ActorDiedError:
                return "the service's Controller is gone and cannot be restarted"
            except Exception as e:  # Ray itself is gone
                return f"the service is gone: {type(e).__name__}: {e}"
        return None

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop the routers (draining in-flight requests), end the hosts, then the rest."""
        ray.get([r.stop.remote(grace_s=grace_s) for r in self.routers])
        ray.get(self.controller.shutdown.remote())
        for actor in [*self.routers, self.controller]:
            ray.kill(actor, no_restart=True)


def _alive(actors: list[Any]) -> list[bool]:
    """False for each actor Ray says is dead for good (a restarting one is alive)."""
    refs = [a.ready.remote() for a in actors]
    ray.wait(refs, num_returns=len(refs), timeout=_WATCH_PERIOD_S)
    out = []
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
            out.append(True)
        except ActorDiedError:
            out.append(False)
        except Exception:  # not answered yet, or restarting
            out.append(True)
    return out


def connect_ray(address: str = "local", num_cpus: int | None = None,
                timeout_s: float = 5.0) -> None:
    """`local` starts an embedded Ray; `auto`, HOST:PORT or `ray://…` joins a running
    cluster. A HOST:PORT where nothing listens is a ConnectionError within timeout_s (Ray
    itself would wait much longer)."""
    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False}
    if address == "local":
        # address="local" starts a new instance even when RAY_ADDRESS names another cluster
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kw)
        return
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    if target and target not in ("auto", "local"):
        _check_reachable(target, timeout_s)
    ray.init(address=address, **kw)


def _check_reachable(address: str, timeout_s: float) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"no Ray cluster answers at {address!r}: {e}") from None


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to listen beyond loopback with the admin API open to anyone who reaches it."""
    if not (token or insecure or is_loopback(host)):
        raise ValueError(f"{host} is reachable beyond this machine: give an admin token "
                         "(--token-file, $MOEFLEET_TOKEN) or say --insecure")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start(spec: ModelSpec, port: int = 50051, host: str = "127.0.0.1", detached: bool = False,
          token: str | None = None, state_dir: str | None = None,
          on_progress: Callable[[dict[str, Any]], None] | None = None,
          tls: TlsConfig | None = None, insecure: bool = False) -> Service:
    """Start everything for one model spec on the connected Ray cluster: the Controller, its
    hosts and experts, then a router on the head and on every node that offers the spec's
    `router.nodes_resource`, each listening on `port` there. `on_progress` is called with
    `Controller.load_progress` while the experts load, and once when they have. With `tls`,
    the routers serve TLS. Beyond loopback, an admin token is required unless `insecure`."""
    check_exposure(host, token, insecure)
    controller = _start_controller(state_dir)
    routers: list[Any] = []
    try:
        deployed = controller.deploy.remote(spec=spec)
        while on_progress is not None and not ray.wait([deployed], timeout=_PROGRESS_PERIOD_S)[0]:
            on_progress(ray.get(controller.load_progress.remote(model=spec.name)))
        ray.get(deployed)  # a failed deploy raises here
        if on_progress is not None:
            on_progress(ray.get(controller.load_progress.remote(model=spec.name)))
        for i, where in enumerate(_router_placements(spec.router.nodes_resource)):
            name = ROUTER_NAME.format(i)
            routers.append(ray.remote(Router).options(
                name=name, namespace=NAMESPACE, num_cpus=spec.router.num_cpus,
                num_gpus=spec.router.num_gpus, lifetime="detached" if detached else None,
                max_concurrency=1000, max_restarts=-1, **where,
            ).remote(controller, spec.router, name=name, interface=host,
                      services=[admin_service(controller, token)], tls=tls))
        try:
            ports = ray.get([r.start.remote(port=port) for r in routers],
                            timeout=spec.router.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            want = {"CPU": spec.router.num_cpus, "GPU": spec.router.num_gpus}
            raise RuntimeError(f"a router did not start within {spec.router.start_timeout_s:.0f}s: the "
                               f"cluster has no node free with {want} (available now: "
                               f"{ray.available_resources()})") from None
        wildcard = host in ("0.0.0.0", "::", "")  # then say where clients can reach each one
        ips = ray.get([r.node_ip.remote() for r in routers]) if wildcard else [host] * len(routers)
        addresses = [f"{ip}:{p}" for ip, p in zip(ips, ports, strict=True)]
        ray.get([controller.add_router.remote(name=ROUTER_NAME.format(i), handle=r, address=a)
                 for i, (r, a) in enumerate(zip(routers, addresses, strict=True))])
    except BaseException:
        ray.get(controller.shutdown.remote())
        for actor in [*routers, controller]:
            ray.kill(actor, no_restart=True)
        raise
    log.info("moefleet serving %s on %s", spec.name, ", ".join(addresses))
    return Service(controller, routers, ips[0], ports[0], addresses)


def _router_placements(nodes_resource: str) -> list[dict[str, Any]]:
    """Ray options for each router: the head's, then one per other live node that offers
    `nodes_resource` (pinned there)."""
    head = [{"resources": _ON_HEAD}]
    if not nodes_resource:
        return head
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(nodes_resource, 0) > 0
             and "node:__internal_head__" not in n["Resources"]]
    return head + [{"scheduling_strategy": NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)}
                   for n in nodes]


def _start_controller(state_dir: str | None) -> Any:
    """The named, detached Controller; one per Ray cluster (namespace)."""
    state_dir = state_dir or _default_state_dir()
    try:
        return ray.remote(Controller).options(
            name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
            max_task_retries=-1, num_cpus=0, max_concurrency=1000, resources=_ON_HEAD,
        ).remote(state_dir=state_dir)
    except ValueError as e:  # the name is taken
        raise RuntimeError(
            f"a moefleet service already runs on this Ray cluster (actor {CONTROLLER_NAME!r} "
            f"in namespace {NAMESPACE!r}); shut it down first"
        ) from e


def _default_state_dir() -> str:
    """One journal folder per Ray session, so a new cluster never replays an old registry."""
    session = Path(ray.get_runtime_context().gcs_address.replace(":", "_"))
    root = Path(os.environ.get("MOEFLEET_STATE_DIR", Path.home() / ".moefleet" / "state"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / "moefleet-state"
    return str(root / session)
