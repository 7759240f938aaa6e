"""The policies compared, each driving a simulated fleet through moefleet's own pure functions.

`autoscale` does what the Controller's loop does each period: `autoscale.decide` on the
smoothed rates (`autoscale.smooth`; decide's two halves, `expert_targets` and `idle_hosts`,
called on arrays), the targets carried out through `placement.apply_counts` (starting hosts
when slots run out, up to hosts.max_count, as the executor does), idle hosts retired through
`autoscale.retirable`, and, every `rebalance_every_s`, `placement.rebalance` as the
Controller's Rebalance calls it.
`static` packs once with `placement.plan_from_scratch` (its placement, `pack_from_scratch`) from
the first hour's mean load; `replan` packs from scratch every `replan_every_s` (EPLB-style).

A plan takes effect when its slowest host has loaded its new replicas one after another
(`cost.load_s` each); until then the previous placement serves and the policy waits, as the
Controller's loop waits for the executor. Moved replicas are the adds of those plans.

    K = (layer, expert) key, N = layers · experts; rates are rows/s.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from moefleet.cluster import autoscale, placement
from moefleet.cluster.placement import Placement, PlacementPlan

from .cost import Layout, load_s
from .scenario import PolicyConfig, Scenario

__all__ = ["Fleet"]


class Fleet:
    """One policy's simulated fleet: its planner (the placement planned last), the layout that
    serves, hosts, timers and counters."""

    def __init__(self, sc: Scenario, pol: PolicyConfig, first_hour: np.ndarray):
        self.sc, self.pol = sc, pol
        E = sc.model.n_routed_experts
        self.keys = [(L, e) for L in range(sc.model.layers) for e in range(E)]
        self.capacity = {self._host_id(i): sc.hosts.slots for i in range(sc.hosts.count)}
        self.planner = placement.Planner(self.keys, self.capacity, {})  # shares self.capacity
        self._next_host = sc.hosts.count
        self.load: np.ndarray | None = None  # [N] rows/s, autoscale.smooth: what the policies act on
        self.state = autoscale.ExpertState.empty(len(self.keys))
        self.empty_since: dict[str, float] = {}
        self.target = np.full(len(self.keys), sc.autoscaling.min_replicas, dtype=np.int64)  # [N]
        self.ready_at, self.last_plan, self.loading = 0.0, 0.0, False
        self.draining: list[str] = []  # hosts a consolidation is emptying: they retire once it serves
        self.adds = 0  # replicas loaded after bring-up
        self.version = 0  # counts the layouts that served: the cost model's profile is per layout
        self._held: dict[str, int] = {}  # `_host_replicas`, for (version, hosts) `_held_for`
        self._held_for: tuple | None = None
        self._to_drain: list[str] = []  # `hosts_to_drain` for (version, hosts) `_drain_for`
        self._remap: tuple[list[str], np.ndarray] = ([], np.zeros(1, dtype=np.int64))  # `_set`'s, for:
        self._remap_for: tuple | None = None  # (the planner's host list, its length, hosts)
        self._drain_for: tuple | None = None
        if pol.kind == "autoscale":
            self._fit(np.zeros(len(self.keys)), dict.fromkeys(self.keys, sc.autoscaling.min_replicas))
        else:
            packed, _ = placement.pack_from_scratch(self._dict(first_hour), self.capacity, self._replicas(),
                                                    max_replicas=len(self.capacity))
            self.planner.reset(packed, own=True)
        self._set()

    @property
    def placement(self) -> Placement:
        """The placement planned last (it serves once its replicas are loaded)."""
        return self.planner.placement

    # ---- one period ------------------------------------------------------------------------

    def step(self, t: float, rate: np.ndarray, load: np.ndarray | None = None) -> None:
        """rate: [N] rows/s measured over the period that ends at t; load: [N] its
        `autoscale.smooth` over the periods so far, when the caller has it (every fleet of a
        run sees the same rates)."""
        self.load = autoscale.smooth(self.sc.autoscaling.smoothing, rate, self.load) if load is None else load
        if self.loading and t >= self.ready_at:
            self.loading = False
            self._serve()
        if t < self.ready_at:
            return  # the executor is still loading the last plan
        kind, every = self.pol.kind, self.pol.replan_every_s
        if kind == "replan" and t - self.last_plan >= every:
            self.last_plan = t
            packed, _ = placement.pack_from_scratch(self._dict(self.load), self.capacity, self._replicas(),
                                                    max_replicas=len(self.capacity))
            adds = _new_hosts(self.placement, packed)
            self.planner.reset(packed, own=True)
            self._schedule(t, adds)
        elif kind == "autoscale":
            self._autoscale(t)

    def _autoscale(self, t: float) -> None:
        """`autoscale.decide`'s two halves, on arrays (decide itself converts dicts to them)."""
        cfg, count = self.sc.autoscaling, self.layout.count
        target, self.state = autoscale.expert_targets(cfg, self.load, count, self.state, t)
        # the Controller's m.target.update(decision.replicas): target where it differs from count
        np.copyto(self.target, target, where=target != count)
        held = self._host_replicas()
        idle, self.empty_since = autoscale.idle_hosts(cfg, held, self.empty_since, t)
        retire = autoscale.retirable(idle, held, self.sc.hosts.count)
        for h in retire:
            del self.capacity[h]
        if retire:
            self._set()
        every = self.pol.rebalance_every_s
        if every and t - self.last_plan >= every:
            self.last_plan = t
            plan = placement.rebalance(self._dict(self.load), self.capacity, self.placement,
                                       max_replicas=len(self.capacity))
            self.planner.reset(plan.placement, own=True)
            self.target = self.planner.count.copy()
            self._schedule(t, _added(plan))
            return
        short = {self.keys[i]: int(self.target[i]) for i in np.flatnonzero(self.target != count)}
        if short:
            plan = self._fit(self.load, short)
            if plan is not None:
                self._schedule(t, _added(plan))
        if cfg.consolidate_max_moves and not self.loading:
            self._consolidate(t)

    def _consolidate(self, t: float) -> None:
        """What the Controller's `_consolidate` does: empty the hosts `hosts_to_drain` names;
        they retire (`autoscale.retirable`) once their replicas serve elsewhere."""
        cfg = self.sc.autoscaling
        key = (self.version, tuple(self.capacity))
        if self._drain_for != key:  # a pure function of what `_host_replicas` is kept for
            self._to_drain = placement.hosts_to_drain(self._host_replicas(), self.capacity,
                                                      cfg.consolidate_max_moves, self.sc.hosts.count,
                                                      cfg.consolidate_spare)
            self._drain_for = key
        hosts = self._to_drain
        if hosts:
            plan, self.draining = placement.drain(self._dict(self.load), self.capacity, self.placement, hosts)
            if self.draining:
                self.planner.reset(plan.placement, own=True)
                self._schedule(t, _added(plan))

    # ---- helpers ---------------------------------------------------------------------------

    def _fit(self, load: np.ndarray, counts: dict) -> PlacementPlan | None:
        """The executor's `apply`: plan the counts, starting hosts while replicas find no slot;
        None (nothing changes) when even hosts.max_count hosts cannot hold them."""
        while True:
            plan = self.planner.apply_counts(load, counts)
            if not plan.unplaced:
                return plan
            self.planner.undo()
            if len(self.capacity) >= self.sc.hosts.max_count:
                return None
            self.capacity[self._host_id(self._next_host)] = self.sc.hosts.slots
            self._next_host += 1

    def _schedule(self, t: float, added_on: list[str]) -> None:
        """Load the planner's new replicas, one host each in `added_on` (each host loads one
        after another); the new placement serves once all are in."""
        per_host = Counter(added_on)
        if not per_host:
            self._serve()
            return
        self.adds += sum(per_host.values())
        self.loading = True
        self.ready_at = t + max(per_host.values()) * load_s(self.sc.cost, self.sc.model)

    def _serve(self) -> None:
        """The planned placement serves; the hosts it drained retire."""
        self._set()
        if self.draining:
            gone = autoscale.retirable(self.draining, self._host_replicas(), self.sc.hosts.count)
            for h in gone:
                del self.capacity[h]
            self.draining = []
            if gone:
                self._set()

    def _set(self) -> None:
        """The planner's placement serves, on the hosts of `capacity`."""
        seen, caps = self.planner.hosts, tuple(self.capacity)
        was = self._remap_for
        if was is not None and was[0] is seen and was[1] == len(seen) and was[2] == caps:
            hosts, remap = self._remap  # the planner's host list only grows until a reset replaces it
        else:
            hosts = sorted(self.capacity)
            index = {h: i for i, h in enumerate(hosts)}
            remap = np.array([index.get(h, -1) for h in seen] or [0], dtype=np.int64)
            self._remap, self._remap_for = (hosts, remap), (seen, len(seen), caps)
        key, host = self.planner.replicas()
        self.layout = Layout(key, remap[host], self.planner.count.copy(), hosts)
        self.version += 1

    def _host_replicas(self) -> dict[str, int]:
        """H -> replicas it serves, over the hosts of `capacity` (made again once either changed)."""
        key = (self.version, tuple(self.capacity))
        if self._held_for != key:
            hosts = self.layout.hosts
            held = np.bincount(self.layout.host, minlength=len(hosts)).tolist()
            self._held = {**dict.fromkeys(self.capacity, 0), **dict(zip(hosts, held, strict=True))}
            self._held_for = key
        return dict(self._held)

    def _replicas(self) -> int:
        return self.pol.replicas or self.sc.hosts.count * self.sc.hosts.slots

    def _dict(self, x: np.ndarray) -> dict[tuple[int, int], float]:
        return dict(zip(self.keys, x.tolist(), strict=True))

    @staticmethod
    def _host_id(i: int) -> str:
        return f"h{i:04d}"


def _new_hosts(was: Placement, now: Placement) -> list[str]:
    """The host of each replica of `now` that `was` does not have (in no particular order):
    what `[h for k, hs in now.items() if hs != was.get(k) for h in set(hs) - set(was.get(k) or
    ())]` counts, without two sets per key for the common key of one replica in both."""
    get, out = was.get, []
    for k, hs in now.items():
        old = get(k)
        if hs == old:
            continue
        if not old:
            out += hs
        elif len(hs) == 1 and len(old) == 1:  # one replica in each, not the same host
            out.append(hs[0])
        else:
            out += set(hs).difference(old)
    return out


def _added(plan: PlacementPlan) -> list[str]:
    """The host of each replica a plan adds (its moves are net changes from the current one)."""
    return [mv.host for mv in plan.moves if mv.op == "add"]
