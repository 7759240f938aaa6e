"""The Controller: the single source of truth for models, experts, replicas and hosts.

A plain async class that the cluster runs as a named, detached Ray actor, restarted on
failure. It takes operators' changes (scale, add or remove an expert, rebalance, autoscaling
on or off), serialises them under one lock, decides them with `placement` and `autoscale`
(pure) and has the `Executor` carry them out: the executor owns the hosts, the routers and
every effect on them, and the Controller reads them through it. The registry is journalled
(msgpack) after every change, each of the two writing its own part, so a restarted
Controller restores it.

A background loop, every period: collect per-expert load and latencies from the routers
(and re-send the current version to a router that lacks it, e.g. one that restarted), drop
hosts that are gone, run the autoscaling policy, and bring every expert back to its target
replica count. A host a router reports gone is checked and its experts restored at once,
onto free slots (`hosts.spare` keeps that many idle hosts started for it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from typing import Any

import ray

from moefleet.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    message_of,
    quote,
)
from moefleet.router.state import RoutingState

from . import autoscale, placement, replan
from .executor import Admit, Executor, Forget
from .hosts import no_room
from .journal import Journal
from .metrics import ControllerMetrics
from .model import check_source, expert_nbytes
from .registry import (
    Key,
    ModelRecord,
    check_new_expert_id,
    check_rebalance_total,
    check_removable,
    check_replica_counts,
    parse_new_expert,
    policy_from_plain,
    policy_to_plain,
    rebalance_knob,
)
from .spec import ModelSpec

__all__ = ["Controller"]

log = logging.getLogger(__name__)
_SPARE_RETRY_S = 30.0  # after a spare host could not start, wait this long before trying again


class Controller:
    def __init__(self, *, state_dir: str | None = None, tick_s: float = 1.0):
        _log_to_stderr()
        self._models: dict[str, ModelRecord] = {}
        self._policy: dict[str, autoscale.PolicyState] = {}
        self._deploys: dict[str, tuple[float, int, int]] = {}  # model -> (start, replicas, bytes each)
        self._journal = Journal(state_dir) if state_dir else None
        self._tick_s = tick_s
        self._lock: asyncio.Lock | None = None
        self._loop_task: asyncio.Task | None = None
        self._setup: asyncio.Task | None = None
        self._stopping: asyncio.Event | None = None
        self._spare_after: dict[str, float] = {}  # model -> when a spare may be started next
        self._last_poll = time.monotonic()
        self._metrics = ControllerMetrics()
        self._exec = Executor(self._metrics, self._journal)
        self._restore = bool(self._journal and ray.get_runtime_context().was_current_actor_reconstructed)
        if self._journal and not self._restore:
            self._journal.clear()
        if self._restore:  # set up (restore, republish, loop) now, not at the first caller's call
            ray.get_runtime_context().current_actor.model_names.remote()

    # ---- bring-up --------------------------------------------------------------------------

    async def deploy(self, *, spec: ModelSpec) -> int:
        """Start the model's hosts, load one replica of every expert, publish version 1."""
        await self._ready()
        async with self._lock:
            if spec.name in self._models:
                raise AlreadyExists(f"model {spec.name!r} is already served")
            await asyncio.to_thread(check_source, spec)  # a bad checkpoint fails before any load
            m = ModelRecord.from_spec(spec)
            counts = {k: max(1, m.autoscaling.min_replicas) for k in m.keys()}
            self._deploys[spec.name] = (time.monotonic(), sum(counts.values()), expert_nbytes(spec))
            self._models[spec.name] = m
            # every start runs to its end (a host that cannot be placed ends itself) before
            # the first failure is raised, so none is left pending when the caller gives up
            started = await asyncio.gather(*(self._exec.fleet.start_host(m) for _ in range(spec.hosts.count)),
                                           return_exceptions=True)
            for r in started:
                if isinstance(r, BaseException):
                    raise r
            m.target.update(counts)
            await self._exec.apply(m, counts)
            return m.version

    async def load_progress(self, *, model: str) -> dict[str, Any]:
        """How far the deploy of `model` is: replicas loaded of total, their bytes (in the
        served dtype) and the seconds since it began. Answers while `deploy` runs."""
        t0, total, nbytes = self._deploys.get(model, (time.monotonic(), 0, 0))
        loaded = min(self._exec.replicas_loaded(model), total)
        return {"loaded": loaded, "total": total, "bytes": loaded * nbytes, "total_bytes": total * nbytes,
                "elapsed_s": time.monotonic() - t0}

    async def add_router(self, *, name: str, handle: Any, address: str = "") -> None:
        await self._ready()
        self._exec.fleet.add_router(name, handle, address)

    async def router_address(self, *, name: str) -> str:
        """HOST:PORT of router `name`: where a restarted router listens again."""
        await self._ready()
        address = self._exec.fleet.router_address(name)
        if address is None:
            raise NotFound(f"no router named {quote(name)}")
        return address

    async def wait_stopping(self) -> None:
        """Returns once the service is being shut down (a foreground `moefleet serve` waits
        on this; Ray carries the call over a restart of this actor)."""
        await self._ready()
        await self._stopping.wait()

    async def shutdown(self) -> None:
        """End every host this Controller started (routers are ended by their owner)."""
        if self._stopping is not None:
            self._stopping.set()  # no spare host starts from now on
        if self._loop_task:
            self._loop_task.cancel()
        self._exec.fleet.end_hosts()
        if self._journal:
            self._journal.clear()

    async def shutdown_service(self, *, grace_s: float = 5.0) -> list[str]:
        """The admin Shutdown: answer now, then stop the routers (they drain for grace_s),
        end the hosts, the routers and this actor. For a service that outlives the shell
        that started it (`serve --detach`)."""
        await self._ready()
        self._stopping.set()
        asyncio.get_running_loop().create_task(self._teardown(grace_s))
        return sorted(self._models)

    async def _teardown(self, grace_s: float) -> None:
        # The Shutdown call that started this is still open in its router: the router's stop
        # lets open calls finish, so its answer leaves before the router ends.
        await self._exec.fleet.stop_routers(grace_s)
        await self.shutdown()
        self._exec.fleet.end_routers()
        log.info("moefleet shut down")
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    # ---- operator changes ------------------------------------------------------------------

    async def scale_expert(self, *, model: str, layer: int, expert: int | None,
                           replicas: int) -> dict[str, int]:
        """Set the replica count of one expert, or of every expert of `layer`."""
        await self._ready()
        async with self._lock:
            m = self._model(model)
            if expert is not None:
                m.expert(layer, expert)  # NotFound for an unknown layer or expert
            keys = [(layer, e) for e in sorted(m.layer(layer)) if expert in (None, e)]
            counts = {k: replicas for k in keys}
            check_replica_counts(m, counts)
            added, removed, _ = await self._apply_target(m, counts)
            return {"routing_version": m.version, "expert": -1 if expert is None else expert,
                    "replicas_added": added, "replicas_removed": removed}

    async def _apply_target(self, m: ModelRecord, counts: dict[Key, int]) -> tuple[int, int, int]:
        """Set and carry out new target counts; a refused change restores the previous ones."""
        before = {k: m.target.get(k) for k in counts}
        m.target.update(counts)
        try:
            return await self._exec.apply(m, counts)
        except ResourceExhausted as e:
            for k, n in before.items():
                if n is None:
                    m.target.pop(k, None)
                else:
                    m.target[k] = n
            self._save()
            raise ResourceExhausted(f"{e}; the target replicas stay as they were") from None

    async def add_expert(self, *, model: str, layer: int, safetensors: bytes,
                         expert: int | None = None, group: int | None = None) -> dict[str, int]:
        """Load a new expert into a slot, then publish a version whose gate has its row."""
        await self._ready()
        async with self._lock:
            m = self._model(model)
            e = m.next_expert_id(layer) if expert is None else expert
            check_new_expert_id(m, layer, e)
            rec, weights = parse_new_expert(m.spec, safetensors, group)
            key = (layer, e)
            counts = {key: max(1, m.autoscaling.min_replicas)}
            check_replica_counts(m, counts)
            if self._journal:
                rec.file = self._journal.write_blob(f"{model}-L{layer}-E{e}.safetensors", safetensors)
            m.target.update(counts)
            try:
                added, _, version = await self._exec.apply(m, counts, Admit(key, rec, ray.put(weights)))
            except BaseException:
                await self._forget_added(m, key)
                raise
            return {"routing_version": version, "expert": e, "replicas_added": added,
                    "replicas_removed": 0}

    async def _forget_added(self, m: ModelRecord, key: Key) -> None:
        """Undo a failed add: unpublish and free whatever of the expert got published (an add
        that failed before its first version left nothing to undo)."""
        m.target.pop(key, None)
        if key[1] in m.experts[key[0]] or key in m.replicas:
            try:
                await self._exec.apply(m, {key: 0}, Forget(key))
            except Exception:
                log.exception("%s: could not free the replicas of failed add %s", m.name, key)
        self._save()

    async def remove_expert(self, *, model: str, layer: int, expert: int) -> dict[str, int]:
        """Publish a version without the expert's gate row, drain, then free its slots."""
        await self._ready()
        async with self._lock:
            m = self._model(model)
            check_removable(m, layer, expert)
            key = (layer, expert)
            _, removed, version = await self._exec.apply(m, {key: 0}, Forget(key))
            return {"routing_version": version, "expert": expert, "replicas_added": 0,
                    "replicas_removed": removed}

    async def rebalance(self, *, model: str, replicas: int = 0, max_moves: int | None = None,
                        min_gain: float | None = None, allow_partial: bool = False) -> dict[str, Any]:
        """Re-plan the model's replicas for its measured load, with few moves. The knob
        (max_moves, min_gain) defaults to the spec's autoscaling.rebalance_*; a plan that
        cannot place every replica asked for changes nothing unless allow_partial."""
        await self._ready()
        async with self._lock:
            m = self._model(model)
            check_rebalance_total(m, replicas)
            max_moves, min_gain = rebalance_knob(m, max_moves, min_gain)
            load = {k: m.tokens_per_s.get(k, 0.0) for k in m.keys()}
            if not any(load.values()):
                raise FailedPrecondition(f"model {model!r} has no measured load yet to plan for")
            current = m.placement()
            capacity = self._exec.fleet.capacity(m.name)
            total = replicas or sum(len(v) for v in current.values())
            plan = replan.plan(m, load, capacity, current, total, max_moves, min_gain)
            placed = sum(len(v) for v in plan.placement.values())
            self._metrics.record_unplaced(m.name, total - placed)
            if placed < total:
                short = replan.shortfall(model, placed, total, capacity)
                if not allow_partial:
                    raise FailedPrecondition(f"{short}; nothing changed (allow_partial places "
                                             f"what fits)")
                log.warning("rebalance: %s", short)
            scratch = placement.plan_from_scratch(load, capacity, total, max_replicas=len(capacity))
            m.target.update({k: len(v) for k, v in plan.placement.items()})
            await self._exec.execute(m, plan.moves)  # `current`, `load` and `capacity` are copies
            return replan.report(load, capacity, current, plan, scratch.placement, total, placed, m.version)

    async def set_autoscaling(self, *, model: str, enabled: bool, **fields: Any) -> dict[str, Any]:
        await self._ready()
        async with self._lock:
            m = self._model(model)
            changes = {k: v for k, v in fields.items() if v is not None}
            try:
                policy = dataclasses.replace(m.autoscaling, enabled=enabled, **changes)
            except (TypeError, ValueError) as e:
                raise InvalidArgument(str(e)) from None
            if not math.isfinite(policy.target_tokens_per_s):
                raise InvalidArgument("target_tokens_per_s must be finite")
            if policy.max_replicas > m.spec.hosts.max_count:
                raise InvalidArgument(f"max_replicas must be <= hosts.max_count ({m.spec.hosts.max_count}): "
                                      f"replicas of one expert sit on distinct hosts")
            m.autoscaling = policy
            self._policy.pop(model, None)
            self._save()
            return vars(m.autoscaling).copy()

    async def host_gone(self, *, host_id: str) -> None:
        """A router saw `host_id` fail: check it, and if it is gone, stop routing to it."""
        await self._ready()
        rec = self._exec.fleet.hosts.get(host_id)
        if rec is not None and not await self._exec.fleet.host_alive(host_id):
            async with self._lock:
                await self._exec.lose_host(host_id, self._models)
                if (m := self._models.get(rec.model)) is not None:
                    await self._restore_targets(m)

    # ---- reads -----------------------------------------------------------------------------

    def pid(self) -> int:
        return os.getpid()

    async def model_names(self) -> list[str]:
        await self._ready()
        return sorted(self._models)

    async def hosts(self) -> dict[str, Any]:
        await self._ready()
        return {h: rec.handle for h, rec in self._exec.fleet.hosts.items()}

    async def routing_state(self, *, model: str) -> RoutingState:
        await self._ready()
        return self._exec.routing_state(self._model(model))

    async def status(self, *, model: str = "") -> dict[str, Any]:
        """The registry and its live figures as plain data (what `moefleet status` shows)."""
        await self._ready()
        names = [model] if model else sorted(self._models)
        return {"models": [self._model(n).status() for n in names],
                "hosts": [{**rec.info, "slots_used": len(rec.slots)}
                          for _, rec in sorted(self._exec.fleet.hosts.items())],
                "routers": [{"name": n, "address": a} for n, a in sorted(self._exec.fleet.routers().items())]}

    # ---- the background loop ---------------------------------------------------------------

    async def _ready(self) -> None:
        """Set up what needs the actor's event loop; restore the journal after a restart.
        Every call waits until that is done, so no answer describes a half-restored state."""
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._stopping = asyncio.Event()
            self._setup = asyncio.get_running_loop().create_task(self._set_up())
        await asyncio.shield(self._setup)

    async def _set_up(self) -> None:
        if self._restore:
            async with self._lock:
                await self._restore_journal()
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            periods = [m.autoscaling.period_s for m in self._models.values() if m.autoscaling.enabled]
            await asyncio.sleep(min([self._tick_s, *periods]))
            try:
                await self._tick()
            except Exception:
                log.exception("controller loop")

    async def _tick(self) -> None:
        await self._poll_routers()
        dead = await self._exec.fleet.dead_hosts()
        async with self._lock:
            for h in dead:
                await self._exec.lose_host(h, self._models)
            now = time.time()  # wall clock: the journalled policy state outlives a restart
            for m in list(self._models.values()):
                if m.autoscaling.enabled:
                    await self._autoscale(m, now)
                await self._restore_targets(m)
        for m in list(self._models.values()):
            self._top_up_spares(m)

    async def _restore_targets(self, m: ModelRecord) -> None:
        """Bring every expert of m to its target replica count (under the lock)."""
        short = {k: n for k, n in m.target.items() if len(m.replicas.get(k, [])) != n}
        if short:
            try:
                await self._exec.apply(m, short)
            except ResourceExhausted as e:  # counted in moefleet_unplaced_replicas
                log.warning("%s: replicas unplaced, targets not met yet: %s", m.name, e)

    def _top_up_spares(self, m: ModelRecord) -> None:
        """Start one idle host in the background while m has fewer than hosts.spare of them
        (and fewer than hosts.max_count hosts in all). Not under the lock: a restore after a
        lost host must not wait for a spare to come up."""
        hosts = [rec for rec in self._exec.fleet.hosts.values() if rec.model == m.name]
        idle = sum(1 for rec in hosts if not rec.slots)
        if (time.monotonic() < self._spare_after.get(m.name, 0.0) or idle >= m.spec.hosts.spare
                or len(hosts) >= m.spec.hosts.max_count or self._stopping.is_set()):
            return
        self._spare_after[m.name] = math.inf  # one start at a time
        asyncio.get_running_loop().create_task(self._start_spare(m))

    async def _start_spare(self, m: ModelRecord) -> None:
        retry = time.monotonic() + _SPARE_RETRY_S
        try:
            why = await asyncio.to_thread(no_room, m.spec.hosts)
            if why is not None:
                log.warning("%s: no spare host for now: %s", m.name, why)
                return
            host_id = await self._exec.fleet.start_host(m)
            if self._stopping.is_set():  # shut down while it started
                self._exec.fleet.end_host(host_id)
            retry = 0.0
        except Exception as e:
            log.warning("%s: a spare host did not start: %s", m.name, message_of(e))
        finally:
            self._spare_after[m.name] = retry

    async def _autoscale(self, m: ModelRecord, now: float) -> None:
        snap = autoscale.Snapshot(
            config=m.autoscaling, tokens_per_s=dict(m.tokens_per_s),
            replicas={k: len(m.replicas.get(k, [])) for k in m.keys()},
            host_replicas={h: len(rec.slots) for h, rec in self._exec.fleet.hosts.items()
                           if rec.model == m.name})
        decision, self._policy[m.name] = autoscale.decide(
            snap, self._policy.get(m.name, autoscale.PolicyState()), now)
        if decision.replicas:
            log.info("autoscaling %s: %s", m.name, decision.replicas)
            m.target.update(decision.replicas)
        retire = autoscale.retirable(decision.retire_hosts, snap.host_replicas, m.spec.hosts.count)
        idle = sum(1 for n in snap.host_replicas.values() if n == 0)
        for h in retire[:max(0, idle - m.spec.hosts.spare)]:  # the spares stay
            log.info("retiring idle host %s", h)
            self._exec.fleet.end_host(h)
        if m.autoscaling.consolidate_max_moves:
            await self._consolidate(m)
        self._save()

    async def _consolidate(self, m: ModelRecord) -> None:
        """Empty the lightly used hosts `placement.hosts_to_drain` names, then retire them."""
        a, capacity = m.autoscaling, self._exec.fleet.capacity(m.name)
        held = {h: len(self._exec.fleet.hosts[h].slots) for h in capacity}
        hosts = placement.hosts_to_drain(held, capacity, a.consolidate_max_moves, m.spec.hosts.count,
                                         a.consolidate_spare)
        if not hosts:
            return
        serving = {h: n for h, n in capacity.items() if held[h]}  # not onto idle (spare) hosts
        plan, emptied = placement.drain(dict(m.tokens_per_s), serving, m.placement(), hosts)
        await self._exec.execute(m, plan.moves)
        held = {h: len(self._exec.fleet.hosts[h].slots) for h in capacity if h in self._exec.fleet.hosts}
        for h in autoscale.retirable(emptied, held, m.spec.hosts.count):
            log.info("retiring drained host %s", h)
            self._exec.fleet.end_host(h)

    async def _poll_routers(self) -> None:
        """Collect per-expert rows and request latencies from every router since last poll."""
        replies = await self._exec.poll_routers(self._models.values())
        now = time.monotonic()
        elapsed, self._last_poll = max(now - self._last_poll, 1e-3), now
        for m in self._models.values():
            m.observe(replies, elapsed)
            self._metrics.record_model(m)
        self._metrics.record_hosts(self._exec.fleet.hosts.values())

    # ---- journal ---------------------------------------------------------------------------

    def _save(self) -> None:
        """Journal the Controller's part: the models and the autoscaling policies' state (the
        executor's fleet journals its own after each of the executor's effects)."""
        if self._journal is None:
            return
        self._journal.update(models={n: m.to_plain() for n, m in self._models.items()},
                             policy={n: policy_to_plain(p) for n, p in self._policy.items()})

    async def _restore_journal(self) -> None:
        state = self._journal.load()
        if state is None:
            return
        self._exec.fleet.restore(state)  # the hosts and routers still alive, the data-plane secret
        self._policy = {n: policy_from_plain(p) for n, p in state.get("policy", {}).items()}
        for name, d in state.get("models", {}).items():
            m, weights = ModelRecord.from_plain(d)
            self._models[name] = m
            await self._exec.restore_model(m, weights)
        log.info("restored %d model(s) and %d host(s) from %s", len(self._models),
                 len(self._exec.fleet.hosts), self._journal.path)

    # ---- helpers ---------------------------------------------------------------------------

    def _model(self, name: str) -> ModelRecord:
        if name not in self._models:
            raise NotFound(f"unknown model {quote(name)}; serving {sorted(self._models)}")
        return self._models[name]


def _log_to_stderr() -> None:
    """moefleet's INFO and up go to the actor's stderr (Ray's worker .err log), once."""
    root = logging.getLogger("moefleet")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)

