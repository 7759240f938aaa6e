"""The executor: the only code that changes the cluster. It carries out placement plans
for the Controller, in DESIGN.md's order:

    scale up / add expert    load weights into free slots → publish a version with them
    scale down / remove      publish a version without them → drain the routers → free slots

It starts hosts when slots run out, publishes routing-table versions (each awaited by every
router), and drops hosts that are gone. The Controller decides what to do and serialises the
changes; what goes where is decided by `placement`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

from ray.exceptions import ActorDiedError, RayActorError

from moefleet.router.errors import FailedPrecondition, ResourceExhausted, message_of

from . import placement
from .hosts import host_name, no_room, start_host
from .metrics import ControllerMetrics
from .model import source_args
from .registry import HostRecord, Key, ModelRecord

__all__ = ["Executor"]

log = logging.getLogger(__name__)
_DRAIN_TIMEOUT_S = 30.0
_CALL_TIMEOUT_S = 30.0


class Executor:
    """hosts: host id -> record; routers: actor name -> handle; weights: (model, layer,
    expert) -> object ref of the FFN weights of experts added at runtime. All three are the
    Controller's own dicts, shared. `save` journals the registry after each change."""

    def __init__(self, hosts: dict[str, HostRecord], routers: dict[str, Any],
                 weights: dict[tuple[str, int, int], Any], save: Callable[[], None],
                 metrics: ControllerMetrics):
        self.hosts, self.routers, self.weights = hosts, routers, weights
        self._save = save
        self._metrics = metrics
        self.loaded: dict[str, int] = {}  # model -> replicas loaded so far (for progress)
        self.dataplane_secret = secrets.token_urlsafe(32)  # hosts' and routers' only (journalled)

    def model_state(self, m: ModelRecord) -> dict[str, Any]:
        """What a router needs for one version: spec, gates, shared experts, replicas by host
        index, and the host handles and ids those indices refer to."""
        host_ids = sorted({h for reps in m.replicas.values() for h, _ in reps})
        index = {h: i for i, h in enumerate(host_ids)}
        replicas: dict[int, dict[int, list[tuple[int, int]]]] = {L: {} for L in m.experts}
        for (L, e), reps in m.replicas.items():
            if reps:
                replicas[L][e] = [(index[h], s) for h, s in reps]
        return {
            "spec": m.spec, "version": m.version,
            "layers": {L: {"gate": m.gate(L), "shared": m.shared[L]} for L in m.experts},
            "replicas": replicas,
            "hosts": [self.hosts[h].handle for h in host_ids], "host_ids": host_ids,
            "dataplane": [self.hosts[h].info.get("dataplane", "") for h in host_ids],
            "dataplane_secret": self.dataplane_secret,
        }

    async def apply(self, m: ModelRecord, counts: dict[Key, int],
                    before_publish=None) -> tuple[int, int, int]:
        """Bring the experts in `counts` to those replica counts; start hosts when slots run
        out (up to hosts.max_count, and only where the cluster has or can add a node for one).
        Raises ResourceExhausted, with no replica changed, when replicas stay unplaced; counts
        them in the moefleet_unplaced_replicas metric. Returns what `execute` returns."""
        load = {k: m.load.get(k, 0.0) for k in set(m.keys()) | set(counts)}
        while True:
            plan = placement.apply_counts(load, self.capacity(m), m.placement(), counts)
            self._metrics.record_unplaced(m.name, len(plan.unplaced))
            if not plan.unplaced:
                break
            hosts_now = sum(1 for h in self.hosts.values() if h.model == m.name)
            short = (f"no free slot for {len(plan.unplaced)} replica(s) of "
                     f"{sorted(set(plan.unplaced))}: {hosts_now} hosts of {m.spec.hosts.slots} slots")
            if hosts_now >= m.spec.hosts.max_count:
                raise ResourceExhausted(f"{short}, hosts.max_count is {m.spec.hosts.max_count}")
            why = await asyncio.to_thread(no_room, m.spec.hosts)
            if why is not None:
                raise ResourceExhausted(f"{short}; {why}")
            await self.start_host(m)
        return await self.execute(m, plan.moves, before_publish)

    async def execute(self, m: ModelRecord, moves: list[placement.Move],
                      before_publish=None) -> tuple[int, int, int]:
        """Adds: load into reserved slots. Then publish (with the adds, without the removes),
        drain the routers, free the removed slots. Adds that find their host full wait for a
        later round, after that round's removes have freed slots; a remove that would leave a
        migrating expert with no replica waits for its add. Once the model serves, a round
        loads at most hosts.loads_per_host replicas per host, so a host's requests never queue
        behind more loads than that (bring-up, and hosts that serve nothing yet, such as a
        spare taking a lost host's experts, load all at once). `before_publish` changes the
        registry (a gate row) in the first version published. Returns (replicas added,
        removed, that first version)."""
        adds = [mv for mv in moves if mv.op == "add"]
        removes = [mv for mv in moves if mv.op == "remove"]
        stays = {mv.key for mv in adds} | {k for k, reps in m.replicas.items()
                                           if len(reps) > sum(1 for r in removes if r.key == k)}
        n_added = n_removed = first = 0
        per_host = m.spec.hosts.loads_per_host if m.version else None
        idle = {h for h, rec in self.hosts.items() if not rec.slots}  # no request to hold up
        while adds or removes or before_publish is not None:
            now, adds = self._fitting(adds, per_host, idle)
            loaded = await self._load(m, now)
            if now:
                log.info("%s: loaded %d of %d replica(s)", m.name, len(loaded), len(now))
            for key, host, slot in loaded:
                m.replicas.setdefault(key, []).append((host, slot))
            ready, removes = self._safe_removes(m, removes, stays, stuck=not loaded and not now)
            freed = [f for f in (self._unpublish(m, mv) for mv in ready) if f]
            if before_publish is not None:
                before_publish()
                before_publish = None
            version = await self.publish(m, strict=True)
            log.info("%s: published routing version %d (+%d -%d replicas)", m.name, version,
                     len(loaded), len(freed))
            first = first or version
            await self._drain_and_free(m.name, version, freed)
            n_added, n_removed = n_added + len(loaded), n_removed + len(freed)
            if adds and not (loaded or freed):
                raise ResourceExhausted(f"{len(adds)} replica(s) found no free slot: {adds}")
        return n_added, n_removed, first

    def _fitting(self, adds: list[placement.Move], per_host: int | None,
                 idle: set[str]) -> tuple[list[placement.Move], list[placement.Move]]:
        """(adds their hosts have a free slot for now, at most per_host per host but any
        number on `idle` hosts; the rest)."""
        free = {h: rec.free_slots() if not per_host or h in idle else min(rec.free_slots(), per_host)
                for h, rec in self.hosts.items()}
        now, later = [], []
        for mv in adds:
            fits = free.get(mv.host, 0) > 0
            (now if fits else later).append(mv)
            free[mv.host] = free.get(mv.host, 0) - fits
        return now, later

    def _safe_removes(self, m: ModelRecord, removes: list[placement.Move], stays: set[Key],
                      stuck: bool) -> tuple[list[placement.Move], list[placement.Move]]:
        """(removes to do now, removes to defer): an expert that keeps replicas in the end is
        never left with none in between, unless nothing else can move (`stuck`)."""
        now, later = [], []
        left = {k: len(reps) for k, reps in m.replicas.items()}
        for mv in removes:
            if mv.key in stays and left.get(mv.key, 0) <= 1 and not stuck:
                later.append(mv)
            else:
                now.append(mv)
                left[mv.key] = left.get(mv.key, 0) - 1
        if stuck and later:
            log.warning("%s: a migration has no free slot to go through; %s briefly has no replica",
                        m.name, sorted({mv.key for mv in later}))
        return now, later

    async def _counted(self, model: str, call: Any) -> Any:
        result = await call
        self.loaded[model] = self.loaded.get(model, 0) + 1
        return result

    async def _load(self, m: ModelRecord, adds: list[placement.Move]) -> list[tuple[Key, str, int]]:
        """Load each add into a reserved slot, all at once; return the loaded ones."""
        jobs = []
        for mv in adds:
            host = self.hosts[mv.host]
            slot = host.reserve(mv.key)
            ref = self.weights.get((m.name, *mv.key))
            call = (host.handle.load.remote(slot, *mv.key, ref) if ref is not None
                    else host.handle.load_source.remote(slot, *mv.key, source_args(m.spec)))
            jobs.append((mv, slot, call))
        results = await asyncio.gather(*(self._counted(m.name, c) for _, _, c in jobs),
                                       return_exceptions=True)
        loaded, error = [], None
        for (mv, slot, _), r in zip(jobs, results, strict=True):
            if isinstance(r, BaseException):
                log.warning("loading %s into %s slot %d failed: %s", mv.key, mv.host, slot, r)
                self.hosts[mv.host].slots.pop(slot, None)
                if not isinstance(r, RayActorError):  # a lost host is the loop's business
                    error = error or r
                continue
            loaded.append((mv.key, mv.host, slot))
        if error is not None:  # nothing of this batch is published: give its slots back
            for _, host_id, slot in loaded:
                self.hosts[host_id].slots.pop(slot, None)
                self.hosts[host_id].handle.free.remote(slot)
            raise error
        return loaded

    def _unpublish(self, m: ModelRecord, mv: placement.Move) -> tuple[str, int] | None:
        reps = m.replicas.get(mv.key, [])
        for i, (h, slot) in enumerate(reps):
            if h == mv.host:
                del reps[i]
                if not reps:
                    m.replicas.pop(mv.key)
                return h, slot
        return None

    async def publish(self, m: ModelRecord, strict: bool = False) -> int:
        """Bump the version and wait until every live router has installed it. A router that
        is gone for good is dropped; one that is restarting takes the current version when it
        is back (the Controller's loop re-sends it to a router that lacks it). One that refused
        the version is logged, or, if `strict`, fails the change (FailedPrecondition) so that
        it is never reported as done."""
        m.version += 1
        state = self.model_state(m)
        names = list(self.routers)
        results = await asyncio.gather(
            *(asyncio.wait_for(self.routers[n].install.remote(state), _CALL_TIMEOUT_S)
              for n in names), return_exceptions=True)
        refused = []
        for n, r in zip(names, results, strict=True):
            if isinstance(r, ActorDiedError):
                log.warning("router %s is gone; it no longer gets new versions", n)
                self.routers.pop(n, None)
            elif isinstance(r, RayActorError):
                log.warning("router %s is restarting; it takes version %d when back", n, m.version)
            elif isinstance(r, BaseException):
                log.warning("router %s did not install version %d: %s", n, m.version, message_of(r))
                refused.append(f"{n}: {message_of(r)}")
        self._metrics.record_model(m)
        self._save()
        if strict and refused:
            raise FailedPrecondition(f"routing version {m.version} of {m.name!r} was not installed "
                                     f"by every router ({'; '.join(refused)})")
        return m.version

    async def _drain_and_free(self, model: str, version: int, slots: list[tuple[str, int]]) -> None:
        if not slots:
            return
        drained = await asyncio.gather(
            *(r.wait_drained.remote(model, version, _DRAIN_TIMEOUT_S) for r in self.routers.values()),
            return_exceptions=True)
        if not all(d is True for d in drained):
            log.warning("routers did not drain %s below version %d: %s", model, version, drained)
        for host_id, slot in slots:
            rec = self.hosts.get(host_id)
            if rec is not None:
                rec.slots.pop(slot, None)
                rec.handle.free.remote(slot)
        self._save()

    async def start_host(self, m: ModelRecord) -> str:
        host_id = host_name(m.name, m.next_host)
        m.next_host += 1
        self._save()  # a Controller restarted mid-start never reuses the name (it ends the host)
        log.info("starting expert host %s", host_id)
        handle, info = await start_host(host_id, m.spec.hosts, m.spec.hosts.start_timeout_s,
                                        self.dataplane_secret)
        log.info("expert host %s is up on node %s", host_id, info.get("node_ip"))
        self.hosts[host_id] = HostRecord(host_id, m.name, handle, info)
        self._save()
        return host_id

    async def lose_host(self, host_id: str, models: dict[str, ModelRecord]) -> None:
        """Stop routing to a dead host; the Controller's loop restores its replicas."""
        rec = self.hosts.pop(host_id, None)
        if rec is None:
            return
        log.warning("expert host %s is gone", host_id)
        m = models.get(rec.model)
        if m is not None:
            for key in list(m.replicas):
                m.replicas[key] = [(h, s) for h, s in m.replicas[key] if h != host_id]
                if not m.replicas[key]:
                    del m.replicas[key]
            await self.publish(m)

    def capacity(self, m: ModelRecord) -> dict[str, int]:
        return {h: rec.slots_total for h, rec in self.hosts.items() if rec.model == m.name}
