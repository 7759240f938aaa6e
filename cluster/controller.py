"""The Controller: the single source of truth for models, experts, replicas and hosts, and
the executor that carries every change out.

A plain async class that the cluster runs as a named, detached Ray actor, restarted on
failure. Every change follows DESIGN.md's order:

    scale up / add expert    load weights into free slots → publish a version with them
    scale down / remove      publish a version without them → drain the routers → free slots

Changes are serialised by one lock; each publish is awaited by every router, and the registry
is journalled (msgpack) after it, so a restarted Controller restores it. A background loop
polls the routers' per-expert load, checks the hosts, runs the autoscaling policy and brings
every expert back to its target replica count (after a host is lost, say).

What goes where is decided by `placement` and `autoscale` (pure); this module has the effects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from safetensors.torch import load as load_safetensors

from moefleet.experts.reference import ExpertWeights
from moefleet.experts.weights import DTYPES
from moefleet.router.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted

from . import autoscale, placement
from .hosts import start_host
from .journal import Journal
from .metrics import ControllerMetrics
from .model import gate_of, source_args, source_of
from .registry import ExpertRecord, HostRecord, Key, ModelRecord, check_removable
from .spec import ModelSpec

__all__ = ["Controller"]

log = logging.getLogger(__name__)
_DRAIN_TIMEOUT_S = 30.0
_CALL_TIMEOUT_S = 30.0
_LOAD_SMOOTHING = 0.5  # weight of the newest poll in each expert's measured load


class Controller:
    def __init__(self, state_dir: str | None = None, tick_s: float = 1.0):
        self._models: dict[str, ModelRecord] = {}
        self._hosts: dict[str, HostRecord] = {}
        self._routers: dict[str, Any] = {}  # actor name -> handle
        self._policy: dict[str, autoscale.PolicyState] = {}
        self._journal = Journal(state_dir) if state_dir else None
        self._tick_s = tick_s
        self._lock: asyncio.Lock | None = None
        self._loop_task: asyncio.Task | None = None
        self._last_poll = time.monotonic()
        self._metrics = ControllerMetrics()
        self._restore = bool(self._journal and ray.get_runtime_context().was_current_actor_reconstructed)
        if self._journal and not self._restore:
            self._journal.clear()

    # ---- bring-up --------------------------------------------------------------------------

    async def deploy(self, spec: ModelSpec) -> int:
        """Start the model's hosts, load one replica of every expert, publish version 1."""
        await self._ready()
        async with self._lock:
            if spec.name in self._models:
                raise AlreadyExists(f"model {spec.name!r} is already served")
            m = self._new_model(spec)
            self._models[spec.name] = m
            await asyncio.gather(*(self._start_host(m) for _ in range(spec.hosts.count)))
            counts = {k: max(1, m.autoscaling.min_replicas) for k in m.keys()}
            m.target.update(counts)
            await self._apply(m, counts)
            return m.version

    async def add_router(self, name: str, handle: Any) -> None:
        await self._ready()
        self._routers[name] = handle
        self._save()

    async def shutdown(self) -> None:
        """End every host this Controller started (routers are ended by their owner)."""
        if self._loop_task:
            self._loop_task.cancel()
        for rec in self._hosts.values():
            ray.kill(rec.handle)
        self._hosts.clear()
        if self._journal:
            self._journal.clear()

    # ---- operator changes ------------------------------------------------------------------

    async def scale_expert(self, model: str, layer: int, expert: int | None,
                           replicas: int) -> dict[str, int]:
        """Set the replica count of one expert, or of every expert of `layer`."""
        await self._ready()
        async with self._lock:
            m = self._model(model)
            if replicas < 1:
                raise InvalidArgument(f"replicas must be >= 1, got {replicas}")
            keys = [(layer, expert)] if expert is not None else [
                (layer, e) for e in sorted(m.experts.get(layer, {}))]
            for k in keys:
                m.expert(*k)
            counts = {k: replicas for k in keys}
            m.target.update(counts)
            added, removed, _ = await self._apply(m, counts)
            return {"routing_version": m.version, "expert": -1 if expert is None else expert,
                    "replicas_added": added, "replicas_removed": removed}

    async def add_expert(self, model: str, layer: int, safetensors: bytes,
                         expert: int | None = None, group: int | None = None) -> dict[str, int]:
        """Load a new expert into a slot, then publish a version whose gate has its row."""
        await self._ready()
        async with self._lock:
            m = self._model(model)
            m.expert(layer, next(iter(m.experts.get(layer, {0: None}))))  # NotFound for the layer
            e = m.next_expert_id(layer) if expert is None else expert
            if e in m.experts[layer]:
                raise AlreadyExists(f"model {model!r} layer {layer} already has expert {e}")
            if e < 0:
                raise InvalidArgument(f"expert ids are >= 0, got {e}")
            rec, weights = _parse_new_expert(m.spec, safetensors, group)
            if self._journal:
                rec.file = self._journal.write_blob(f"{model}-L{layer}-E{e}.safetensors", safetensors)
            self._weights[(model, layer, e)] = ray.put(weights)
            key = (layer, e)
            counts = {key: max(1, m.autoscaling.min_replicas)}
            m.target.update(counts)

            def admit():
                m.experts[layer][e] = rec
            try:
                added, _, version = await self._apply(m, counts, before_publish=admit)
            except BaseException:
                m.target.pop(key, None)
                self._weights.pop((model, layer, e), None)
                raise
            return {"routing_version": version, "expert": e, "replicas_added": added,
                    "replicas_removed": 0}

    async def remove_expert(self, model: str, layer: int, expert: int) -> dict[str, int]:
        """Publish a version without the expert's gate row, drain, then free its slots."""
        await self._ready()
        async with self._lock:
            m = self._model(model)
            check_removable(m, layer, expert)
            key = (layer, expert)

            def forget():
                del m.experts[layer][expert]
                for d in (m.target, m.load, m.rate):
                    d.pop(key, None)
            _, removed, version = await self._apply(m, {key: 0}, before_publish=forget)
            self._weights.pop((model, layer, expert), None)
            return {"routing_version": version, "expert": expert, "replicas_added": 0,
                    "replicas_removed": removed}

    async def rebalance(self, model: str, replicas: int = 0) -> dict[str, Any]:
        """Re-plan the model's replicas for its measured load, with few moves."""
        await self._ready()
        async with self._lock:
            m = self._model(model)
            load = {k: m.load.get(k, 0.0) for k in m.keys()}
            if not any(load.values()):
                raise ResourceExhausted(f"model {model!r} has no measured load yet to plan for")
            current = m.placement()
            capacity = self._capacity(m)
            total = replicas or sum(len(v) for v in current.values())
            cap = len(capacity)  # replicas of one expert sit on distinct hosts
            plan = placement.rebalance(load, capacity, current, total, max_replicas=cap)
            scratch = placement.plan_from_scratch(load, capacity, total, max_replicas=cap)
            counts = {k: len(v) for k, v in plan.placement.items()}
            m.target.update(counts)
            before = _imbalance(placement.replica_loads(load, current))
            await self._execute(m, plan.moves)
            return {"routing_version": m.version, "moves": len(plan.moves),
                    "moves_from_scratch": _distance(current, scratch.placement),
                    "imbalance_before": before,
                    "imbalance_after": _imbalance(placement.replica_loads(load, plan.placement))}

    async def set_autoscaling(self, model: str, enabled: bool, **fields: Any) -> dict[str, Any]:
        await self._ready()
        async with self._lock:
            m = self._model(model)
            changes = {k: v for k, v in fields.items() if v is not None}
            try:
                m.autoscaling = dataclasses.replace(m.autoscaling, enabled=enabled, **changes)
            except (TypeError, ValueError) as e:
                raise InvalidArgument(str(e)) from None
            self._policy.pop(model, None)
            self._save()
            return vars(m.autoscaling).copy()

    async def host_gone(self, host_id: str) -> None:
        """A router saw `host_id` fail: check it, and if it is gone, stop routing to it."""
        await self._ready()
        rec = self._hosts.get(host_id)
        if rec is not None and not await _alive(rec.handle):
            async with self._lock:
                await self._lose_host(host_id)

    # ---- reads -----------------------------------------------------------------------------

    async def model_names(self) -> list[str]:
        await self._ready()
        return sorted(self._models)

    async def hosts(self) -> dict[str, Any]:
        await self._ready()
        return {h: rec.handle for h, rec in self._hosts.items()}

    async def model_state(self, model: str) -> dict[str, Any]:
        await self._ready()
        return self._model_state(model)

    async def status(self, model: str = "") -> dict[str, Any]:
        """The registry and its live figures as plain data (what `moefleet status` shows)."""
        await self._ready()
        names = [model] if model else sorted(self._models)
        return {"models": [self._model_status(self._model(n)) for n in names],
                "hosts": [{**rec.info, "slots_used": len(rec.slots)}
                          for _, rec in sorted(self._hosts.items())]}

    def _model_state(self, model: str) -> dict[str, Any]:
        """What a router needs for one version: spec, gates, shared experts, replicas by host
        index, and the host handles and ids those indices refer to."""
        m = self._model(model)
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
            "hosts": [self._hosts[h].handle for h in host_ids], "host_ids": host_ids,
        }

    def _model_status(self, m: ModelRecord) -> dict[str, Any]:
        layers = []
        for L in sorted(m.experts):
            experts = [{"expert": e, "group": r.group,
                        "replicas": [{"host": h, "slot": s} for h, s in m.replicas.get((L, e), [])],
                        "tokens_per_s": m.load.get((L, e), 0.0),
                        "target_replicas": m.target.get((L, e), 0)}
                       for e, r in sorted(m.experts[L].items())]
            layers.append({"layer": L, "experts": experts})
        a = m.autoscaling
        return {"name": m.name, "routing_version": m.version, "dtype": m.spec.dtype,
                "hidden_size": m.spec.moe.hidden_size, "layers": layers,
                "autoscaling": {k: getattr(a, k) for k in _AUTOSCALING_FIELDS},
                "latency_p50_s": m.latency.get("p50_s", 0.0),
                "latency_p99_s": m.latency.get("p99_s", 0.0),
                "requests_per_s": m.latency.get("requests_per_s", 0.0)}

    # ---- the executor ----------------------------------------------------------------------

    async def _apply(self, m: ModelRecord, counts: dict[Key, int],
                     before_publish=None) -> tuple[int, int, int]:
        """Bring the experts in `counts` to those replica counts; start hosts when slots run
        out (up to hosts.max_count). Returns what `_execute` returns."""
        load = {k: m.load.get(k, 0.0) for k in set(m.keys()) | set(counts)}
        while True:
            plan = placement.apply_counts(load, self._capacity(m), m.placement(), counts)
            if not plan.unplaced:
                break
            hosts_now = sum(1 for h in self._hosts.values() if h.model == m.name)
            if hosts_now >= m.spec.hosts.max_count:
                raise ResourceExhausted(
                    f"no free slot for {len(plan.unplaced)} replica(s) of {sorted(set(plan.unplaced))}: "
                    f"{hosts_now} hosts of {m.spec.hosts.slots} slots, hosts.max_count is "
                    f"{m.spec.hosts.max_count}")
            await self._start_host(m)
        return await self._execute(m, plan.moves, before_publish)

    async def _execute(self, m: ModelRecord, moves: list[placement.Move],
                       before_publish=None) -> tuple[int, int, int]:
        """Adds: load into reserved slots. Then publish (with the adds, without the removes),
        drain the routers, free the removed slots. A migration onto a full host is done in two
        rounds: its removes first. `before_publish` changes the registry (a gate row) in the
        first version published. Returns (replicas added, removed, that first version)."""
        adds = [mv for mv in moves if mv.op == "add"]
        removes = [mv for mv in moves if mv.op == "remove"]
        n_added = n_removed = 0
        first = 0
        while True:
            now = [mv for mv in adds if self._hosts[mv.host].free_slots() > 0]
            adds = [mv for mv in adds if mv not in now]
            loaded = await self._load(m, now)
            for key, host, slot in loaded:
                m.replicas.setdefault(key, []).append((host, slot))
            freed = [self._unpublish(m, mv) for mv in removes]
            removes = []
            if before_publish is not None:
                before_publish()
                before_publish = None
            version = await self._publish(m)
            first = first or version
            await self._drain_and_free(m.name, version, [f for f in freed if f])
            n_added += len(loaded)
            n_removed += sum(1 for f in freed if f)
            if not adds or not (loaded or freed):
                break
        if adds:
            raise ResourceExhausted(f"{len(adds)} replica(s) found no free slot: {adds}")
        return n_added, n_removed, first

    async def _load(self, m: ModelRecord, adds: list[placement.Move]) -> list[tuple[Key, str, int]]:
        """Load each add into a reserved slot, all at once; return the loaded ones."""
        jobs = []
        for mv in adds:
            host = self._hosts[mv.host]
            slot = host.reserve(mv.key)
            ref = self._weights.get((m.name, *mv.key))
            call = (host.handle.load.remote(slot, *mv.key, ref) if ref is not None
                    else host.handle.load_source.remote(slot, *mv.key, source_args(m.spec)))
            jobs.append((mv, slot, call))
        results = await asyncio.gather(*(c for _, _, c in jobs), return_exceptions=True)
        loaded = []
        for (mv, slot, _), r in zip(jobs, results, strict=True):
            if isinstance(r, BaseException):
                log.warning("loading %s into %s slot %d failed: %s", mv.key, mv.host, slot, r)
                self._hosts[mv.host].slots.pop(slot, None)
                if isinstance(r, RayActorError):
                    continue  # the loop notices the lost host
                raise r
            loaded.append((mv.key, mv.host, slot))
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

    async def _publish(self, m: ModelRecord) -> int:
        """Bump the version and wait until every live router has installed it."""
        m.version += 1
        state = self._model_state(m.name)
        names = list(self._routers)
        results = await asyncio.gather(
            *(asyncio.wait_for(self._routers[n].install.remote(state), _CALL_TIMEOUT_S)
              for n in names), return_exceptions=True)
        for n, r in zip(names, results, strict=True):
            if isinstance(r, RayActorError):
                log.warning("router %s is gone; it no longer gets new versions", n)
                self._routers.pop(n, None)
            elif isinstance(r, BaseException):
                log.warning("router %s did not install version %d: %s", n, m.version, r)
        self._metrics.record_model(m)
        self._save()
        return m.version

    async def _drain_and_free(self, model: str, version: int, slots: list[tuple[str, int]]) -> None:
        if not slots:
            return
        drained = await asyncio.gather(
            *(r.wait_drained.remote(model, version, _DRAIN_TIMEOUT_S) for r in self._routers.values()),
            return_exceptions=True)
        if not all(d is True for d in drained):
            log.warning("routers did not drain %s below version %d: %s", model, version, drained)
        for host_id, slot in slots:
            rec = self._hosts.get(host_id)
            if rec is not None:
                rec.slots.pop(slot, None)
                rec.handle.free.remote(slot)
        self._save()

    async def _start_host(self, m: ModelRecord) -> str:
        host_id = f"{m.name}-host-{m.next_host}"
        m.next_host += 1
        handle, info = await start_host(host_id, m.spec.hosts, m.spec.hosts.start_timeout_s)
        self._hosts[host_id] = HostRecord(host_id, m.name, handle, info)
        self._save()
        return host_id

    async def _lose_host(self, host_id: str) -> None:
        """Stop routing to a dead host; the loop restores its replicas elsewhere."""
        rec = self._hosts.pop(host_id, None)
        if rec is None:
            return
        log.warning("expert host %s is gone", host_id)
        m = self._models.get(rec.model)
        if m is not None:
            for key in list(m.replicas):
                m.replicas[key] = [(h, s) for h, s in m.replicas[key] if h != host_id]
                if not m.replicas[key]:
                    del m.replicas[key]
            await self._publish(m)

    def _capacity(self, m: ModelRecord) -> dict[str, int]:
        return {h: rec.slots_total for h, rec in self._hosts.items() if rec.model == m.name}

    # ---- the background loop ---------------------------------------------------------------

    async def _ready(self) -> None:
        """Set up what needs the actor's event loop; restore the journal after a restart."""
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._weights: dict[tuple[str, int, int], Any] = {}
            if self._restore:
                async with self._lock:
                    await self._restore_journal()
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            try:
                await self._tick()
            except Exception:
                log.exception("controller loop")

    async def _tick(self) -> None:
        await self._poll_routers()
        dead = [h for h, rec in list(self._hosts.items()) if not await _alive(rec.handle)]
        async with self._lock:
            for h in dead:
                await self._lose_host(h)
            now = time.time()  # wall clock: the journalled policy state outlives a restart
            for m in list(self._models.values()):
                if m.autoscaling.enabled:
                    await self._autoscale(m, now)
                short = {k: n for k, n in m.target.items() if len(m.replicas.get(k, [])) != n}
                if short:
                    try:
                        await self._apply(m, short)
                    except ResourceExhausted as e:
                        log.warning("cannot restore %s's replicas yet: %s", m.name, e)

    async def _autoscale(self, m: ModelRecord, now: float) -> None:
        snap = autoscale.Snapshot(
            config=m.autoscaling, tokens_per_s=dict(m.rate),  # the policy smooths it
            replicas={k: len(m.replicas.get(k, [])) for k in m.keys()},
            host_replicas={h: len(rec.slots) for h, rec in self._hosts.items() if rec.model == m.name})
        decision, self._policy[m.name] = autoscale.decide(
            snap, self._policy.get(m.name, autoscale.PolicyState()), now)
        if decision.replicas:
            log.info("autoscaling %s: %s", m.name, decision.replicas)
            m.target.update(decision.replicas)
        floor = m.spec.hosts.count
        for h in decision.retire_hosts:
            n_hosts = sum(1 for r in self._hosts.values() if r.model == m.name)
            if n_hosts > floor and h in self._hosts and not self._hosts[h].slots:
                log.info("retiring idle host %s", h)
                ray.kill(self._hosts.pop(h).handle)
        self._save()

    async def _poll_routers(self) -> None:
        """Collect per-expert rows and request latencies from every router since last poll."""
        names = list(self._routers)
        got = await asyncio.gather(*(asyncio.wait_for(self._routers[n].take_load.remote(), 5.0)
                                     for n in names), return_exceptions=True)
        now = time.monotonic()
        elapsed, self._last_poll = max(now - self._last_poll, 1e-3), now
        for name, m in self._models.items():
            rows: dict[Key, float] = {}
            lat: list[float] = []
            for r in got:
                if isinstance(r, BaseException):
                    continue
                for L, per in r["rows"].get(name, {}).items():
                    for e, n in per.items():
                        rows[(L, e)] = rows.get((L, e), 0.0) + n
                lat.extend(r["latency_s"].get(name, []))
            for k in m.keys():
                rate = m.rate[k] = rows.get(k, 0.0) / elapsed
                old = m.load.get(k)
                m.load[k] = rate if old is None else _LOAD_SMOOTHING * rate + (1 - _LOAD_SMOOTHING) * old
            m.latency = _latency_summary(lat, elapsed)
            self._metrics.record_model(m)
        self._metrics.record_hosts(self._hosts.values())

    # ---- journal ---------------------------------------------------------------------------

    def _save(self) -> None:
        if self._journal is None:
            return
        self._journal.save({
            "models": {n: m.to_plain() for n, m in self._models.items()},
            "hosts": [{"id": h.id, "model": h.model, "info": h.info,
                       "slots": [[s, L, e] for s, (L, e) in h.slots.items()]}
                      for h in self._hosts.values()],
            "routers": sorted(self._routers),
            "policy": {n: _policy_to_plain(p) for n, p in self._policy.items()},
        })

    async def _restore_journal(self) -> None:
        state = self._journal.load()
        if state is None:
            return
        for h in state["hosts"]:
            try:
                handle = ray.get_actor(h["id"], namespace="moefleet")
            except ValueError:
                continue  # gone while the Controller was down: its replicas are dropped below
            self._hosts[h["id"]] = HostRecord(h["id"], h["model"], handle, h["info"],
                                              {s: (L, e) for s, L, e in h["slots"]})
        for name in state["routers"]:
            try:
                self._routers[name] = ray.get_actor(name, namespace="moefleet")
            except ValueError:
                pass
        self._policy = {n: _policy_from_plain(p) for n, p in state.get("policy", {}).items()}
        for name, d in state["models"].items():
            m = self._restore_model(d)
            self._models[name] = m
            await self._publish(m)
        log.info("restored %d model(s) and %d host(s) from %s", len(self._models),
                 len(self._hosts), self._journal.path)

    def _restore_model(self, d: dict[str, Any]) -> ModelRecord:
        spec = ModelSpec.from_dict(d["spec"])
        m = self._new_model(spec)
        m.version, m.next_host = d["version"], d["next_host"]
        m.autoscaling = autoscale.AutoscalingConfig(**d["autoscaling"])
        for L, e in d["removed"]:
            m.experts[L].pop(e, None)
        for L, e, group, file in d["added"]:
            with open(file, "rb") as f:
                rec, weights = _parse_new_expert(spec, f.read(), group)
            rec.file = file
            m.experts[L][e] = rec
            self._weights[(spec.name, L, e)] = ray.put(weights)
        m.target = {(L, e): n for L, e, n in d["target"]}
        for L, e, h, s in d["replicas"]:
            if h in self._hosts:
                m.replicas.setdefault((L, e), []).append((h, s))
        return m

    # ---- helpers ---------------------------------------------------------------------------

    def _new_model(self, spec: ModelSpec) -> ModelRecord:
        src = source_of(spec)
        experts = {}
        for L in spec.layers:
            g = gate_of(spec, L)
            bias = [None] * len(g.expert_ids) if g.bias is None else g.bias.tolist()
            experts[L] = {int(e): ExpertRecord(g.weight[i], bias[i], int(g.group_ids[i]))
                          for i, e in enumerate(g.expert_ids.tolist())}
        return ModelRecord(spec, experts, {L: src.shared(L) for L in spec.layers},
                           spec.autoscaling)

    def _model(self, name: str) -> ModelRecord:
        if name not in self._models:
            raise NotFound(f"unknown model {name!r}; serving {sorted(self._models)}")
        return self._models[name]


_AUTOSCALING_FIELDS = ("enabled", "target_tokens_per_s", "min_replicas", "max_replicas",
                       "upscale_delay_s", "downscale_delay_s")


def _parse_new_expert(spec: ModelSpec, data: bytes, group: int | None) -> tuple[ExpertRecord, ExpertWeights]:
    """Validate an AddExpert file against the model; its gate record and FFN weights."""
    cfg = spec.moe
    try:
        t = load_safetensors(data)
    except Exception as e:
        raise InvalidArgument(f"the expert file is not a readable safetensors file: {e}") from None
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    want = {"gate.weight": (1, h), "gate_proj.weight": (inter, h), "up_proj.weight": (inter, h),
            "down_proj.weight": (h, inter)}
    for key, shape in want.items():
        if key not in t:
            raise InvalidArgument(f"the expert file has no tensor {key!r}; it needs {sorted(want)}")
        if tuple(t[key].shape) != shape:
            raise InvalidArgument(f"{key} has shape {list(t[key].shape)}; model {spec.name!r} "
                                  f"needs {list(shape)}")
    bias_key = "gate.e_score_correction_bias"
    biased = cfg.topk_method == "noaux_tc"
    if bias_key in t and not biased:
        raise InvalidArgument(f"{bias_key} given, but model {spec.name!r} "
                              f"(topk_method {cfg.topk_method}) has no selection bias")
    if bias_key in t and tuple(t[bias_key].shape) != (1,):
        raise InvalidArgument(f"{bias_key} has shape {list(t[bias_key].shape)}; it needs [1]")
    bias = float(t[bias_key][0]) if bias_key in t else (0.0 if biased else None)
    grouped = cfg.topk_method != "greedy" and cfg.n_group > 1
    if grouped and group is None:
        raise InvalidArgument(f"model {spec.name!r} routes by group (n_group {cfg.n_group}): "
                              f"name the new expert's group")
    g = 0 if group is None else group
    if not 0 <= g < (cfg.n_group if grouped else 1):
        raise InvalidArgument(f"group {g} is outside 0..{(cfg.n_group if grouped else 1) - 1}")
    for key in want:
        if not torch.isfinite(t[key].float()).all():
            raise InvalidArgument(f"{key} holds non-finite values")
    dt = DTYPES[spec.dtype]
    weights = ExpertWeights(t["gate_proj.weight"].to(dt), t["down_proj.weight"].to(dt),
                            t["up_proj.weight"].to(dt))
    return ExpertRecord(t["gate.weight"][0].to(dt), bias, g), weights


def _policy_to_plain(p: autoscale.PolicyState) -> dict[str, Any]:
    return {"smoothed": [[L, e, v] for (L, e), v in p.smoothed.items()],
            "pending": [[L, e, n, t] for (L, e), (n, t) in p.pending.items()],
            "host_empty_since": dict(p.host_empty_since)}


def _policy_from_plain(d: dict[str, Any]) -> autoscale.PolicyState:
    return autoscale.PolicyState({(L, e): v for L, e, v in d["smoothed"]},
                                 {(L, e): (n, t) for L, e, n, t in d["pending"]},
                                 dict(d["host_empty_since"]))


def _imbalance(loads: list[float]) -> float:
    """max / mean of per-replica loads (1.0 is perfect)."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def _distance(a: dict[Key, list[str]], b: dict[Key, list[str]]) -> int:
    """Replicas added plus removed to turn placement a into b."""
    pa = {(k, h) for k, hs in a.items() for h in hs}
    pb = {(k, h) for k, hs in b.items() for h in hs}
    return len(pa ^ pb)


def _latency_summary(lat: list[float], elapsed_s: float) -> dict[str, float]:
    if not lat:
        return {"p50_s": 0.0, "p99_s": 0.0, "requests_per_s": 0.0}
    s = sorted(lat)
    pick = lambda q: s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]  # noqa: E731
    return {"p50_s": pick(0.5), "p99_s": pick(0.99), "requests_per_s": len(s) / elapsed_s}


async def _alive(handle: Any, timeout_s: float = 10.0) -> bool:
    """False only when Ray says the actor is dead; a busy host is alive."""
    try:
        await asyncio.wait_for(handle.info.remote(), timeout_s)
    except RayActorError:
        return False
    except asyncio.TimeoutError:
        return True
    return True
