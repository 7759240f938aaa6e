"""The cluster's actors, as the executor keeps them: the expert hosts (started, pinged, ended)
and the routers (registered, polled, stopped), with the data plane's secret they share.

Owned by the `Executor`, the only code with effects on them; the Controller reads it through
`Executor.fleet`. It journals its own part (hosts, routers, secret) after each change to them,
with the model a change touched when it is given one. Knows nothing of placement or routing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import ray
from ray.exceptions import RayActorError

from .hosts import NAMESPACE, host_name, start_host
from .journal import Journal
from .registry import HostRecord, ModelRecord

__all__ = ["Fleet"]

log = logging.getLogger(__name__)
_POLL_TIMEOUT_S = 5.0
_PING_TIMEOUT_S = 10.0


class Fleet:
    """The hosts (id -> record), the routers (name -> handle, and the HOST:PORT each listens
    on) and the data-plane secret."""

    def __init__(self, journal: Journal | None = None):
        self._journal = journal
        self._hosts: dict[str, HostRecord] = {}
        self._routers: dict[str, Any] = {}  # name -> handle: the routers that get new versions
        self._addresses: dict[str, str] = {}  # router name -> HOST:PORT
        self._secret = secrets.token_urlsafe(32)  # hosts' and routers' only (journalled)

    # ---- reads -----------------------------------------------------------------------------

    @property
    def hosts(self) -> Mapping[str, HostRecord]:
        """host id -> record, read-only."""
        return MappingProxyType(self._hosts)

    @property
    def router_handles(self) -> Mapping[str, Any]:
        """name -> handle of every router that gets new versions, read-only."""
        return MappingProxyType(self._routers)

    @property
    def dataplane_secret(self) -> str:
        return self._secret

    def routers(self) -> dict[str, str]:
        """name -> HOST:PORT of every router that gets new versions."""
        return {n: self._addresses.get(n, "") for n in self._routers}

    def router_address(self, name: str) -> str | None:
        """Where router `name` was registered to listen (None: never registered)."""
        return self._addresses.get(name)

    def capacity(self, model: str) -> dict[str, int]:
        """host id -> slots, of the hosts started for `model`."""
        return {h: rec.slots_total for h, rec in self._hosts.items() if rec.model == model}

    # ---- hosts -----------------------------------------------------------------------------

    def add_host(self, rec: HostRecord) -> None:
        """Take in a host that is already up (one a restarted Controller finds again)."""
        self._hosts[rec.id] = rec

    async def start_host(self, m: ModelRecord) -> str:
        host_id = host_name(m.name, m.next_host)
        m.next_host += 1
        self.record(m)  # a Controller restarted mid-start never reuses the name (it ends the host)
        log.info("starting expert host %s", host_id)
        handle, info = await start_host(host_id, m.spec.hosts, m.spec.hosts.start_timeout_s,
                                        self._secret)
        log.info("expert host %s is up on node %s", host_id, info.get("node_ip"))
        self._hosts[host_id] = HostRecord(host_id, m.name, handle, info)
        self.record(m)
        return host_id

    async def dead_hosts(self) -> list[str]:
        """The hosts Ray says are dead (a busy one is alive)."""
        hosts = list(self._hosts.items())
        alive = await asyncio.gather(*(_alive(rec.handle) for _, rec in hosts))
        return [h for (h, _), ok in zip(hosts, alive, strict=True) if not ok]

    async def host_alive(self, host_id: str) -> bool:
        rec = self._hosts.get(host_id)
        return rec is not None and await _alive(rec.handle)

    def drop_host(self, host_id: str) -> HostRecord | None:
        """Forget a host that is gone (not journalled here: the change that follows is)."""
        return self._hosts.pop(host_id, None)

    def end_host(self, host_id: str) -> None:
        """End a host that holds no published replica (idle, drained, or started too late)."""
        ray.kill(self._hosts.pop(host_id).handle, no_restart=True)
        self.record()

    def end_hosts(self) -> None:
        """End every host (the service shuts down)."""
        for rec in self._hosts.values():
            ray.kill(rec.handle, no_restart=True)
        self._hosts.clear()
        self.record()

    # ---- routers ---------------------------------------------------------------------------

    def add_router(self, name: str, handle: Any, address: str) -> None:
        self._routers[name] = handle
        self._addresses[name] = address
        self.record()

    def forget_router(self, name: str) -> None:
        """Stop sending versions to a router that is gone for good."""
        if self._routers.pop(name, None) is not None:
            self.record()

    async def take_rows(self) -> dict[str, Any]:
        """Every router's `take_rows` reply since the last poll, or the error it raised."""
        names = list(self._routers)
        got = await asyncio.gather(*(asyncio.wait_for(self._routers[n].take_rows.remote(), _POLL_TIMEOUT_S)
                                     for n in names), return_exceptions=True)
        return dict(zip(names, got, strict=True))

    async def stop_routers(self, grace_s: float) -> None:
        """Stop every router taking requests; each lets its open calls finish within grace_s."""
        await asyncio.gather(*(r.stop.remote(grace_s=grace_s) for r in self._routers.values()),
                             return_exceptions=True)

    def end_routers(self) -> None:
        for r in self._routers.values():
            ray.kill(r, no_restart=True)

    # ---- journal ---------------------------------------------------------------------------

    def record(self, m: ModelRecord | None = None) -> None:
        """Journal the fleet and, when given, model m as a change left it."""
        if self._journal is None:
            return
        self._journal.update(
            entries={"models": {m.name: m.to_plain()}} if m is not None else None,
            hosts=[{"id": h.id, "model": h.model, "info": h.info,
                    "slots": [[s, L, e] for s, (L, e) in h.slots.items()]}
                   for h in self._hosts.values()],
            routers=self.routers(),
            dataplane_secret=self._secret,  # the live hosts check it
        )

    def restore(self, state: dict[str, Any]) -> None:
        """Take back a journalled snapshot's hosts and routers that are still alive, and the
        data-plane secret the live hosts check."""
        self._secret = state.get("dataplane_secret", self._secret)
        for h in state.get("hosts", []):
            try:
                handle = ray.get_actor(h["id"], namespace=NAMESPACE)
            except ValueError:
                continue  # gone while the Controller was down: its replicas are dropped
            self.add_host(HostRecord(h["id"], h["model"], handle, h["info"],
                                     {s: (L, e) for s, L, e in h["slots"]}))
        for name, address in state.get("routers", {}).items():
            try:
                self._routers[name] = ray.get_actor(name, namespace=NAMESPACE)
                self._addresses[name] = address
            except ValueError:
                pass


async def _alive(handle: Any, timeout_s: float = _PING_TIMEOUT_S) -> bool:
    """False only when Ray says the actor is dead; a busy host is alive."""
    try:
        await asyncio.wait_for(handle.info.remote(), timeout_s)
    except RayActorError:
        return False
    except asyncio.TimeoutError:
        return True
    return True
