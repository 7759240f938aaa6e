"""The executor: the only code that changes the cluster. It carries out placement plans
for the Controller, in DESIGN.md's order:

    scale up / add expert    load weights into free slots → publish a version with them
    scale down / remove      publish a version without them → drain the routers → free slots

It owns what those effects touch: the fleet of expert hosts and routers (cluster/fleet.py,
which starts and ends them and journals them, with the model a change touched, after every
effect) and the weights of experts added at runtime. Each routing-table version it publishes
is awaited by every router.
The Controller decides what to do and serialises the changes, and a change's gate row
reaches the executor as data (`Admit`, `Forget`); what goes where is decided by `placement`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError

from moefleet.core.errors import FailedPrecondition, ResourceExhausted, message_of
from moefleet.experts.reference import ExpertWeights
from moefleet.router.state import HostEntry, LayerRouting, RoutingState

from . import placement
from .fleet import Fleet
from .hosts import LOADS, end_orphans, no_room
from .journal import Journal
from .metrics import ControllerMetrics
from .model import source_args
from .registry import ExpertRecord, Key, ModelRecord

__all__ = ["Executor", "Admit", "Forget"]

log = logging.getLogger(__name__)
_DRAIN_TIMEOUT_S = 30.0
_CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Admit:
    """A new expert: its gate record joins the first version the change publishes. `weights`
    is the object ref of its FFN weights (ExpertWeights), which its replicas load."""

    key: Key
    record: ExpertRecord
    weights: Any


@dataclass(frozen=True)
class Forget:
    """An expert that leaves the first version the change publishes: its gate row, target,
    measured load and added weights go."""

    key: Key


class Executor:
    """Owns the fleet (the hosts and routers, `fleet.Fleet`), the object refs of added
    experts' FFN weights ((model, layer, expert) -> ref) and how many replicas each model has
    loaded. The Controller reads them through `fleet`, `replicas_loaded` and
    `routing_state`."""

    def __init__(self, metrics: ControllerMetrics, journal: Journal | None = None):
        self._metrics = metrics
        self.fleet = Fleet(journal)
        self._weights: dict[tuple[str, int, int], Any] = {}  # added experts' FFN weights (refs)
        self._loaded: dict[str, int] = {}  # model -> replicas loaded so far (for progress)

    # ---- reads -----------------------------------------------------------------------------

    def replicas_loaded(self, model: str) -> int:
        return self._loaded.get(model, 0)

    def routing_state(self, m: ModelRecord) -> RoutingState:
        """What a router needs for m's current version: gates, shared experts, and each
        replica as (index into the hosts it lists, slot)."""
        host_ids = sorted({h for reps in m.replicas.values() for h, _ in reps})
        index = {h: i for i, h in enumerate(host_ids)}
        replicas: dict[int, dict[int, tuple[tuple[int, int], ...]]] = {L: {} for L in m.experts}
        for (L, e), reps in m.replicas.items():
            if reps:
                replicas[L][e] = tuple((index[h], s) for h, s in reps)
        layers = {L: LayerRouting(m.gate(L), replicas[L], m.shared[L]) for L in m.experts}
        fleet = self.fleet.hosts
        hosts = tuple(HostEntry(h, fleet[h].handle, fleet[h].info.get("dataplane", "")) for h in host_ids)
        return RoutingState(m.name, m.version, m.spec.moe, m.spec.dtype, layers, hosts,
                            self.fleet.dataplane_secret)

    # ---- carrying out a change -------------------------------------------------------------

    async def apply(self, m: ModelRecord, counts: dict[Key, int],
                    gate: Admit | Forget | None = None) -> tuple[int, int, int]:
        """Bring the experts in `counts` to those replica counts; start hosts when slots run
        out (up to hosts.max_count, and only where the cluster has or can add a node for one).
        Raises ResourceExhausted, with no replica changed, when replicas stay unplaced; counts
        them in the moefleet_unplaced_replicas metric. Returns what `execute` returns."""
        load = {k: m.tokens_per_s.get(k, 0.0) for k in set(m.keys()) | set(counts)}
        while True:
            plan = placement.apply_counts(load, self.fleet.capacity(m.name), m.placement(), counts)
            self._metrics.record_unplaced(m.name, len(plan.unplaced))
            if not plan.unplaced:
                return await self.execute(m, plan.moves, gate)
            await self._start_host_for(m, plan.unplaced)

    async def execute(self, m: ModelRecord, moves: list[placement.Move],
                      gate: Admit | Forget | None = None) -> tuple[int, int, int]:
        """In rounds: load adds into reserved slots, then publish (with the adds, without the
        removes, with `gate`'s change in the first version), drain the routers, free the
        removed slots. Adds that find their host full wait for a later round, after that
        round's removes have freed slots; a remove that would leave a migrating expert with no
        replica waits for its add. Once the model serves, a round loads at most
        hosts.loads_per_host replicas per host, so a host's requests never queue behind more
        loads than that (bring-up, and hosts that serve nothing yet, such as a spare taking a
        lost host's experts, load all at once). Returns (replicas added, removed, the first
        version published)."""
        adds, removes, stays = _split(m, moves)
        per_host = m.spec.hosts.loads_per_host if m.version else None
        idle = {h for h, rec in self.fleet.hosts.items() if not rec.slots}  # no request to hold up
        added = removed = first = 0
        while adds or removes or gate is not None:
            now, adds = self._fitting(adds, per_host, idle)
            loaded = await self._load(m, now, gate)
            ready, removes = self._safe_removes(m, removes, stays, stuck=not now)
            freed = self._unpublish(m, ready)
            self._change_gate(m, gate)
            version = await self.publish(m, strict=True)
            log.info("%s: published routing version %d (+%d -%d replicas)", m.name, version,
                     len(loaded), len(freed))
            await self._drain_and_free(m.name, version, freed)
            gate, added, removed, first = None, added + len(loaded), removed + len(freed), first or version
            if adds and not (loaded or freed):
                raise ResourceExhausted(f"{len(adds)} replica(s) found no free slot: {adds}")
        return added, removed, first

    def _fitting(self, adds: list[placement.Move], per_host: int | None,
                 idle: set[str]) -> tuple[list[placement.Move], list[placement.Move]]:
        """(adds their hosts have a free slot for now, at most per_host per host but any
        number on `idle` hosts; the rest)."""
        free = {h: rec.free_slots() if not per_host or h in idle else min(rec.free_slots(), per_host)
                for h, rec in self.fleet.hosts.items()}
        now, later = [], []
        for mv in adds:
            fits = free.get(mv.host, 0) > 0
            (now if fits else later).append(mv)
            free[mv.host] = free.get(mv.host, 0) - fits
        return now, later

    async def _load(self, m: ModelRecord, adds: list[placement.Move],
                    gate: Admit | Forget | None) -> list[tuple[Key, str, int]]:
        """Load each add into a reserved slot, all at once; the loaded ones join m's replicas
        (the next version publishes them) and are returned. A failed load, other than on a
        lost host, gives back every slot of the batch and is raised."""
        jobs = []
        for mv in adds:
            slot = self.fleet.hosts[mv.host].reserve(mv.key)
            jobs.append((mv, slot, self._load_call(m, mv, slot, gate)))
        results = await asyncio.gather(*(self._counted(m.name, c) for _, _, c in jobs),
                                       return_exceptions=True)
        loaded, error = [], None
        for (mv, slot, _), r in zip(jobs, results, strict=True):
            if isinstance(r, BaseException):
                log.warning("loading %s into %s slot %d failed: %s", mv.key, mv.host, slot, r)
                self.fleet.hosts[mv.host].slots.pop(slot, None)
                if not isinstance(r, RayActorError):  # a lost host is the loop's business
                    error = error or r
                continue
            loaded.append((mv.key, mv.host, slot))
        if error is not None:  # nothing of this batch is published: give its slots back
            self._free([(host, slot) for _, host, slot in loaded])
            raise error
        if adds:
            log.info("%s: loaded %d of %d replica(s)", m.name, len(loaded), len(adds))
        for key, host, slot in loaded:
            m.replicas.setdefault(key, []).append((host, slot))
        return loaded

    def _load_call(self, m: ModelRecord, mv: placement.Move, slot: int,
                   gate: Admit | Forget | None) -> Any:
        """The host call that loads mv's expert into `slot`: an added expert's weights from the
        object store, any other expert's from the spec's weight source."""
        host, (layer, expert) = self.fleet.hosts[mv.host].handle, mv.key
        ref = gate.weights if isinstance(gate, Admit) and gate.key == mv.key else (
            self._weights.get((m.name, layer, expert)))
        if ref is not None:  # on the host's own thread for loads, beside its requests
            return host.load_weights.options(concurrency_group=LOADS).remote(
                slot=slot, layer=layer, expert=expert, weights=ref)
        return host.load_weights_from.options(concurrency_group=LOADS).remote(
            slot=slot, layer=layer, expert=expert, source=source_args(m.spec))

    async def _counted(self, model: str, call: Any) -> Any:
        result = await call
        self._loaded[model] = self._loaded.get(model, 0) + 1
        return result

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

    def _unpublish(self, m: ModelRecord, removes: list[placement.Move]) -> list[tuple[str, int]]:
        """Take the removed replicas out of m (the next version no longer has them); their
        (host, slot)s, to free once the routers have drained."""
        freed = []
        for mv in removes:
            reps = m.replicas.get(mv.key, [])
            i = next((i for i, (h, _) in enumerate(reps) if h == mv.host), None)
            if i is not None:
                freed.append(reps.pop(i))
                if not reps:
                    m.replicas.pop(mv.key)
        return freed

    def _change_gate(self, m: ModelRecord, gate: Admit | Forget | None) -> None:
        """Give m (and so the next version) `gate`'s change; keep an admitted expert's weights
        for its later loads, drop a forgotten one's."""
        if gate is None:
            return
        (L, e), ref_key = gate.key, (m.name, *gate.key)
        if isinstance(gate, Admit):
            m.experts[L][e] = gate.record
            self._weights[ref_key] = gate.weights
            return
        m.experts[L].pop(e, None)
        for d in (m.target, m.tokens_per_s):
            d.pop(gate.key, None)
        self._weights.pop(ref_key, None)

    async def publish(self, m: ModelRecord, strict: bool = False) -> int:
        """Bump the version and wait until every live router has installed it. A router that
        is gone for good is dropped; one that is restarting takes the current version when it
        is back (the Controller's loop re-sends it to a router that lacks it). One that refused
        the version is logged, or, if `strict`, fails the change (FailedPrecondition) so that
        it is never reported as done."""
        m.version += 1
        state = self.routing_state(m)
        routers = dict(self.fleet.router_handles)
        results = await asyncio.gather(
            *(asyncio.wait_for(r.install.remote(state=state), _CALL_TIMEOUT_S) for r in routers.values()),
            return_exceptions=True)
        refused = []
        for n, r in zip(routers, results, strict=True):
            if isinstance(r, ActorDiedError):
                log.warning("router %s is gone; it no longer gets new versions", n)
                self.fleet.forget_router(n)
            elif isinstance(r, RayActorError):
                log.warning("router %s is restarting; it takes version %d when back", n, m.version)
            elif isinstance(r, BaseException):
                log.warning("router %s did not install version %d: %s", n, m.version, message_of(r))
                refused.append(f"{n}: {message_of(r)}")
        self._metrics.record_model(m)
        self.fleet.record(m)
        if strict and refused:
            raise FailedPrecondition(f"routing version {m.version} of {m.name!r} was not installed "
                                     f"by every router ({'; '.join(refused)})")
        return m.version

    async def _drain_and_free(self, model: str, version: int, slots: list[tuple[str, int]]) -> None:
        if not slots:
            return
        drained = await asyncio.gather(
            *(r.wait_drained.remote(model=model, version=version, timeout_s=_DRAIN_TIMEOUT_S)
              for r in self.fleet.router_handles.values()),
            return_exceptions=True)
        if not all(d is True for d in drained):
            log.warning("routers did not drain %s below version %d: %s", model, version, drained)
        self._free(slots)
        self.fleet.record()

    def _free(self, slots: list[tuple[str, int]]) -> None:
        """Give back each (host, slot), on hosts still there."""
        for host_id, slot in slots:
            rec = self.fleet.hosts.get(host_id)
            if rec is not None:
                rec.slots.pop(slot, None)
                rec.handle.free.remote(slot=slot)

    # ---- hosts and routers ---------------------------------------------------------------

    async def _start_host_for(self, m: ModelRecord, unplaced: list[Key]) -> None:
        """Start one more host of m for replicas that found no slot, or raise ResourceExhausted
        when m may have no more hosts or the cluster has no room for one."""
        hosts_now = len(self.fleet.capacity(m.name))
        short = (f"no free slot for {len(unplaced)} replica(s) of "
                 f"{sorted(set(unplaced))}: {hosts_now} hosts of {m.spec.hosts.slots} slots")
        if hosts_now >= m.spec.hosts.max_count:
            raise ResourceExhausted(f"{short}, hosts.max_count is {m.spec.hosts.max_count}")
        why = await asyncio.to_thread(no_room, m.spec.hosts)
        if why is not None:
            raise ResourceExhausted(f"{short}; {why}")
        await self.fleet.start_host(m)

    async def lose_host(self, host_id: str, models: Mapping[str, ModelRecord]) -> None:
        """Stop routing to a dead host; the Controller's loop restores its replicas."""
        rec = self.fleet.drop_host(host_id)
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

    async def poll_routers(self, models: Iterable[ModelRecord]) -> list[dict[str, Any]]:
        """Every router's `take_rows` reply since the last poll, from those that answer. A
        router gone for good is forgotten; one that Ray restarted but that does not listen yet
        is told to come back (it normally does so by itself); one that lacks the current
        version of a model (it fetched its state before a publish) is sent it."""
        models = list(models)
        got = await self.fleet.take_rows()
        for name, took in got.items():
            self._reconcile_router(name, took, models)
        return [r for r in got.values() if not isinstance(r, BaseException)]

    def _reconcile_router(self, name: str, took: Any, models: list[ModelRecord]) -> None:
        if isinstance(took, ActorDiedError):
            log.warning("router %s is gone for good", name)
            self.fleet.forget_router(name)
            return
        if isinstance(took, BaseException):
            return  # busy or restarting: next period
        router = self.fleet.router_handles[name]
        if took.get("versions") is None:  # registered, so it listened once: restarted
            router.restart.remote()
            return
        for m in models:
            if took["versions"].get(m.name, 0) < m.version:
                log.info("router %s lacks %s version %d; sending it", name, m.name, m.version)
                router.install.remote(state=self.routing_state(m))

    # ---- after a restart -------------------------------------------------------------------

    async def restore_model(self, m: ModelRecord, weights: dict[Key, ExpertWeights]) -> None:
        """Serve a journalled model again: keep its replicas on hosts still alive, hold its
        added experts' weights, end hosts it started that the journal missed, and publish."""
        for key, reps in list(m.replicas.items()):
            m.replicas[key] = [(h, s) for h, s in reps if h in self.fleet.hosts]
            if not m.replicas[key]:
                del m.replicas[key]
        for (L, e), w in weights.items():
            self._weights[(m.name, L, e)] = ray.put(w)
        end_orphans(m.name, m.next_host, self.fleet.hosts)
        await self.publish(m)


def _split(m: ModelRecord, moves: list[placement.Move]
           ) -> tuple[list[placement.Move], list[placement.Move], set[Key]]:
    """(adds, removes, the experts that keep a replica once the moves are done)."""
    adds = [mv for mv in moves if mv.op == "add"]
    removes = [mv for mv in moves if mv.op == "remove"]
    stays = {mv.key for mv in adds} | {k for k, reps in m.replicas.items()
                                       if len(reps) > sum(1 for r in removes if r.key == k)}
    return adds, removes, stays
