"""The router's request path for one MoE layer: gate, plan, fan out, combine.

`Engine.forward` is the whole hot path. It captures the model's current `ModelState` (one
routing-table version) once, so a request runs on the version it started with, even while a
new version is installed. Hosts are reached through an injected `call_host` coroutine, so
the engine runs against Ray actors in the service and against plain objects in tests.

Across requests the engine keeps what the hot path learns: rows in flight per host (the
plan sends rows to the replicas with the fewest), hosts found dead (a call raised `HostGone`;
their rows are retried on other replicas of the same version), requests in flight per
version (so a caller can wait for old versions to drain), and rows routed per expert.

Rows whose expert has no live replica left (its last host died) wait, up to
`restore_wait_s`, for a newer version that restores the expert, and then run there; the
rest of the request keeps its version. The version a request reports is the one its gating
ran on: a restored replica holds the same expert (checked by its gate row).

Knows nothing of gRPC, and nothing of how experts compute beyond the shared-expert FFN.

# T = tokens, H = hidden, K = experts per token, N = T·K dispatched rows, S = hosts
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from moefleet.core.config import MoEConfig
from moefleet.core.errors import HostGone, InvalidArgument, NotFound, Unavailable, quote
from moefleet.experts.reference import SharedExperts

from .dispatch import HostBatch, LayerTable, combine, plan
from .gating import Gate, route

__all__ = ["LayerState", "ModelState", "Engine", "CallHost"]

# From this many tokens on, the pure tensor steps (gating, gathering rows, shared experts,
# combine) run on a worker thread, so the event loop keeps taking (and refusing) requests while
# they run; torch releases the GIL inside them. Below it, the thread hop costs more than it frees.
_OFFLOAD_TOKENS = 256

# call_host(host, x [n, H], batch) -> awaitable y [n, H]; it should start the host's work
# before returning, so all hosts and the router's shared experts run at the same time. It
# raises HostGone when the host is gone for good (its rows are then retried elsewhere).
CallHost = Callable[[Any, torch.Tensor, HostBatch], Awaitable[torch.Tensor]]


@dataclass(frozen=True)
class LayerState:
    gate: Gate
    table: LayerTable
    shared: SharedExperts | None = None


@dataclass(frozen=True)
class ModelState:
    """Everything a request needs, for one routing-table version. Never mutated."""

    name: str
    cfg: MoEConfig
    dtype: torch.dtype
    version: int
    layers: dict[int, LayerState]
    hosts: list[Any]  # indexed by the host numbers in each LayerTable
    host_ids: list[str]  # parallel to hosts: each host's id, the key of in_flight_rows/dead_hosts

    def __post_init__(self):
        if len(self.host_ids) != len(self.hosts):
            raise ValueError(f"{len(self.hosts)} hosts but {len(self.host_ids)} host ids")


@dataclass
class _Flight:
    """Where a request counts as in flight: (model, version), or None while it waits for a
    restore with nothing at any host (so it holds up no drain)."""

    engine: Engine
    key: tuple[str, int] | None = None

    def move(self, key: tuple[str, int] | None) -> None:
        running = self.engine._running
        if self.key is not None:
            running[self.key] -= 1
            if not running[self.key]:
                del running[self.key]
                for ev in self.engine._drain_waiters:
                    ev.set()
        if key is not None:
            running[key] = running.get(key, 0) + 1
        self.key = key


@dataclass(frozen=True)
class _Job:
    """One host call: rows x go to hosts[host] as `batch`; their results land at y[pos]."""

    host: int
    pos: slice | torch.Tensor  # its rows among the request's: a range at first, [n] on retry
    x: torch.Tensor  # [n, H]
    batch: HostBatch


class Engine:
    """Serves forward passes for the installed models.

    in_flight_rows: host id -> rows sent to it and not yet answered, over all requests and
    models (hosts with none are absent). dead_hosts: ids of hosts whose call raised
    HostGone; plans avoid them until a newly installed state no longer lists them.
    on_host_gone(host_id) is called once per newly dead host; it must not block.
    restore_wait_s: how long rows of an expert with no live replica wait for a version that
    restores one (0: they fail at once with Unavailable).
    """

    def __init__(self, call_host: CallHost, device: str = "auto",
                 on_host_gone: Callable[[str], None] | None = None, restore_wait_s: float = 0.0):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._call_host = call_host
        self._on_host_gone = on_host_gone
        self.restore_wait_s = restore_wait_s
        self._models: dict[str, ModelState] = {}
        self.in_flight_rows: dict[str, int] = {}
        self.dead_hosts: set[str] = set()
        self._running: dict[tuple[str, int], int] = {}  # (model, version) -> requests
        self._drain_waiters: set[asyncio.Event] = set()
        self._install_waiters: set[asyncio.Event] = set()
        self._rows: dict[tuple[str, int], torch.Tensor] = {}  # (model, layer) -> [X] rows
        self._live: dict[tuple[str, int, int, frozenset[int]], LayerTable] = {}

    def install(self, state: ModelState) -> bool:
        """Swap in a new version; requests already running keep the one they captured.
        Dead hosts that no installed state lists any more are forgotten. A version older
        than the installed one is ignored (False): versions arrive from the Controller's
        publishing and from a restarted router's own fetch, in either order."""
        now = self._models.get(state.name)
        if now is not None and now.version > state.version:
            return False
        layers = {
            i: LayerState(ls.gate.to(self.device), ls.table, _to_device(ls.shared, self.device))
            for i, ls in state.layers.items()
        }
        self._models[state.name] = replace(state, layers=layers)
        self.dead_hosts &= {h for st in self._models.values() for h in st.host_ids}
        self._live = {key: t for key, t in self._live.items() if key[0] != state.name}
        for ev in self._install_waiters:
            ev.set()
        return True

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def state(self, model: str) -> ModelState:
        try:
            return self._models[model]
        except KeyError:
            raise NotFound(f"unknown model {quote(model)}; serving {sorted(self._models)}") from None

    def check(self, model: str, layer: int, x: torch.Tensor) -> None:
        """The request check: raise the domain error for a request this engine cannot serve
        (an unknown model or layer, or x not [T, H] of the model's hidden size). `forward`
        runs only checked requests (the batcher checks each one before it is queued)."""
        st = self.state(model)
        if x.dim() != 2:
            raise InvalidArgument(f"hidden_states must have shape [T, H], got {list(x.shape)}")
        if layer not in st.layers:
            raise NotFound(f"model {st.name!r} has no MoE layer {layer}; "
                           f"layers: {sorted(st.layers)}")
        if x.shape[1] != st.cfg.hidden_size:
            raise InvalidArgument(
                f"hidden_states has hidden size {x.shape[1]}; model {st.name!r} expects "
                f"{st.cfg.hidden_size}"
            )

    # ---- the hot path ------------------------------------------------------------------

    async def forward(self, model: str, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x: [T, H], as `check` passed it -> (y [T, H] in x's dtype, routing version used)."""
        st = self.state(model)  # the version this request runs on
        with self._in_flight(model, st.version) as flight:
            ls = st.layers[layer]
            if x.shape[0] == 0:
                return x.clone(), st.version
            xd = x.to(self.device)
            big = x.shape[0] >= _OFFLOAD_TOKENS
            topk_w, topk_ids = await _pure(big, route, xd, ls.gate, st.cfg)  # [T, K], [T, K]
            gone: set[str] = set()  # ids of hosts that failed during this request
            p = plan(topk_ids, self._live_table(st, layer, gone), self._rows_in_flight_at(st),
                     defer_missing=True)
            ids = topk_ids.reshape(-1).cpu()  # [N]
            if p.deferred and not self.restore_wait_s:  # refused before any host is called
                raise self._unrestored(st, layer, ids[p.order[-p.deferred:]], gone)
            self._count(model, layer, ids)
            rows = await _pure(big, _gather, x.to(st.dtype), p.tokens(st.cfg.num_experts_per_tok))
            y = torch.empty(rows.shape, dtype=torch.float32, device=self.device)  # [N, H]
            jobs = [_Job(b.host, slice(b.start, b.end), rows[b.start:b.end], b) for b in p.batches]
            shared = lambda: _pure(big, self._shared, xd, ls.shared)  # noqa: E731
            out, failed = await self._run(st, jobs, y, gone, shared)
            if failed.numel() or p.deferred:
                n = rows.shape[0]
                failed = torch.cat([failed, torch.arange(n - p.deferred, n)])
                await self._retry(st, layer, ids[p.order], failed, rows, y, gone, flight)
            out = await _pure(big, combine, y, p, topk_w, x.shape[0], out)
            return out.to(x.dtype).cpu(), st.version

    async def _run(self, st: ModelState, jobs: list[_Job], y: torch.Tensor, gone: set[str],
                   during: Callable[[], Any] | None = None) -> tuple[Any, torch.Tensor]:
        """Issue every job's host call, run `during` meanwhile, write each answer into y
        [N, H] at its rows. Returns (during's result, [M] positions whose host is gone)."""
        calls, meanwhile = [], None
        try:
            for j in jobs:
                calls.append(self._issue(st, j))
            if during is not None:  # overlaps with the hosts
                meanwhile = asyncio.ensure_future(during())
        finally:
            results = await asyncio.gather(*calls, return_exceptions=True)
        if meanwhile is not None:
            meanwhile = await meanwhile
        failed, error = [], None
        for j, r in zip(jobs, results, strict=True):
            if isinstance(r, HostGone):
                self._mark_dead(st.host_ids[j.host])
                gone.add(st.host_ids[j.host])
                failed.append(torch.arange(y.shape[0])[j.pos])
            elif isinstance(r, BaseException):
                error = error or r
            else:
                y[j.pos] = r.to(y.device, y.dtype)
        if isinstance(error, (LookupError, ConnectionError)):
            raise Unavailable(f"an expert host failed: {error}") from error
        if error is not None:
            raise error
        return meanwhile, torch.cat(failed) if failed else torch.zeros(0, dtype=torch.long)

    async def _retry(self, st: ModelState, layer: int, e: torch.Tensor, failed: torch.Tensor,
                     rows: torch.Tensor, y: torch.Tensor, gone: set[str], flight: _Flight) -> None:
        """e: [N] expert id of each row; failed: [M] positions not answered yet (their host is
        gone, or their expert had no live replica) -> their answers written into y. Each round
        sends them to live replicas of the same experts; rows of experts with none left wait
        for a newer version that restores one (at most restore_wait_s in all)."""
        cur, loop = st, asyncio.get_running_loop()
        deadline = loop.time() + self.restore_wait_s
        while failed.numel():
            q = plan(e[failed][:, None], self._live_table(cur, layer, gone), self._rows_in_flight_at(cur),
                     defer_missing=True)
            pos = failed[q.order]  # [M] in the new plan's order
            waiting = pos[pos.numel() - q.deferred:]
            if q.batches:
                jobs = [_Job(b.host, pos[b.start:b.end], rows[pos[b.start:b.end]], b)
                        for b in q.batches]
                _, lost = await self._run(cur, jobs, y, gone)
                failed = torch.cat([lost, waiting])
                continue
            experts = sorted(set(e[waiting].tolist()))
            if not self.restore_wait_s:
                raise self._unrestored(cur, layer, e[waiting], gone)
            flight.move(None)  # nothing of this request is at a host while it waits
            cur = await self._restored(st, cur, layer, experts, deadline, gone)
            flight.move((st.name, cur.version))

    async def _restored(self, st: ModelState, cur: ModelState, layer: int, experts: list[int],
                        deadline: float, gone: set[str]) -> ModelState:
        """The first installed version newer than `cur` that still has `experts` as `st`
        knew them; Unavailable once `deadline` passes or if they were removed."""
        loop = asyncio.get_running_loop()
        while (now := self._models.get(st.name)) is None or now.version <= cur.version:
            left = deadline - loop.time()
            if left <= 0:
                raise self._unrestored(cur, layer, torch.tensor(experts), gone)
            await _woken(self._install_waiters, left)
        if layer not in now.layers or not _same_experts(st.layers[layer].gate,
                                                        now.layers[layer].gate, experts):
            raise Unavailable(f"expert(s) {experts} of layer {layer} were removed or replaced "
                              f"while their rows waited for a replica")
        return now

    def _unrestored(self, st: ModelState, layer: int, e: torch.Tensor, gone: set[str]) -> Unavailable:
        """The error for rows of experts e [M] that found no live replica in st."""
        dead = sorted(gone | (set(st.host_ids) & self.dead_hosts))
        why = f"expert host(s) {dead} gone and " if dead else ""
        waited = f" came back within {self.restore_wait_s:g}s" if self.restore_wait_s else ""
        return Unavailable(f"{why}no replica for expert(s) {sorted(set(e.tolist()))} of layer "
                           f"{layer}{waited}")

    def _issue(self, st: ModelState, job: _Job) -> asyncio.Future:
        """Start one host call now; its rows count as in flight until it settles."""
        host_id, n = st.host_ids[job.host], job.x.shape[0]
        self.in_flight_rows[host_id] = self.in_flight_rows.get(host_id, 0) + n
        try:
            call = asyncio.ensure_future(self._call_host(st.hosts[job.host], job.x, job.batch))
        except Exception as e:  # raised before returning: settle it like a failed call
            call = asyncio.get_running_loop().create_future()
            call.set_exception(e)
        call.add_done_callback(lambda _: self._settle(host_id, n))
        return call

    def _settle(self, host_id: str, n: int) -> None:
        left = self.in_flight_rows[host_id] - n
        if left:
            self.in_flight_rows[host_id] = left
        else:
            del self.in_flight_rows[host_id]

    def _mark_dead(self, host_id: str) -> None:
        if host_id not in self.dead_hosts:
            self.dead_hosts.add(host_id)
            if self._on_host_gone is not None:
                self._on_host_gone(host_id)

    def _rows_in_flight_at(self, st: ModelState) -> torch.Tensor:
        """[S] rows in flight at each of the state's hosts."""
        return torch.tensor([self.in_flight_rows.get(h, 0) for h in st.host_ids], dtype=torch.long)

    def _live_table(self, st: ModelState, layer: int, gone: set[str]) -> LayerTable:
        """The layer's table without the dead hosts (and those this request saw fail)."""
        dead = frozenset(i for i, h in enumerate(st.host_ids) if h in self.dead_hosts or h in gone)
        table = st.layers[layer].table
        if not dead:
            return table
        key = (st.name, st.version, layer, dead)
        if key not in self._live:
            self._live[key] = table.without_hosts(set(dead))
        return self._live[key]

    @staticmethod
    def _shared(x: torch.Tensor, shared: SharedExperts | None) -> torch.Tensor | None:
        if shared is None:
            return None
        return shared(x.to(shared.ffn.w1.dtype)).float()  # [T, H]

    # ---- draining ----------------------------------------------------------------------

    @contextmanager
    def _in_flight(self, model: str, version: int) -> Iterator[_Flight]:
        flight = _Flight(self)
        flight.move((model, version))
        try:
            yield flight
        finally:
            flight.move(None)

    async def wait_drained(self, model: str, version: int, timeout_s: float) -> bool:
        """True once no request of `model` runs on a version older than `version` (at once
        if none does); False if some still does after timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(m == model and v < version for m, v in self._running):
            left = deadline - loop.time()
            if left <= 0:
                return False
            await _woken(self._drain_waiters, left)
        return True

    # ---- rows per expert ----------------------------------------------------------------

    def _count(self, model: str, layer: int, ids: torch.Tensor) -> None:
        """ids: [N] routed expert ids, added into the (model, layer) accumulator [X]."""
        acc = self._rows.get((model, layer), torch.zeros(0, dtype=torch.long))
        n = torch.bincount(ids, minlength=acc.numel())  # [X'] with X' >= X
        if n.numel() > acc.numel():
            acc = torch.cat([acc, acc.new_zeros(n.numel() - acc.numel())])
        self._rows[(model, layer)] = acc.add_(n)

    def take_rows(self) -> dict[str, dict[int, dict[int, int]]]:
        """{model: {layer: {expert id: rows routed}}} since the previous call (non-zero
        entries only); starts counting afresh."""
        rows, self._rows = self._rows, {}
        out: dict[str, dict[int, dict[int, int]]] = {}
        for (model, layer), acc in rows.items():
            ids = acc.nonzero().flatten()
            if ids.numel():
                out.setdefault(model, {})[layer] = dict(zip(ids.tolist(), acc[ids].tolist(),
                                                            strict=True))
        return out


def _to_device(shared: SharedExperts | None, device: torch.device) -> SharedExperts | None:
    if shared is None:
        return None
    f = shared.ffn
    ffn = type(f)(f.w1.to(device), f.w2.to(device), f.w3.to(device))
    gate = None if shared.gate is None else shared.gate.to(device)
    return SharedExperts(ffn, gate)


async def _pure(offload: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), on a worker thread when `offload`; fn must not touch the engine's state."""
    return await asyncio.to_thread(fn, *args) if offload else fn(*args)


async def _woken(waiters: set[asyncio.Event], timeout_s: float) -> None:
    """Wait, at most timeout_s, for the engine to set the event this adds to `waiters`; the
    caller checks its condition again. One event per wait: the engine is bound to no loop."""
    ev = asyncio.Event()
    waiters.add(ev)
    try:
        await asyncio.wait_for(ev.wait(), timeout_s)
    except asyncio.TimeoutError:
        pass
    finally:
        waiters.discard(ev)


def _same_experts(a: Gate, b: Gate, experts: list[int]) -> bool:
    """Whether gates a and b hold the same row (and bias) for each of `experts`."""
    for e in experts:
        ra, rb = (torch.nonzero(g.expert_ids == e).flatten() for g in (a, b))
        if rb.numel() != 1 or not torch.equal(a.weight[ra[0]], b.weight[rb[0]].to(a.weight.device)):
            return False
        if (a.bias is None) != (b.bias is None) or (
                a.bias is not None and float(a.bias[ra[0]]) != float(b.bias[rb[0]])):
            return False
    return True


def _gather(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """x: [T, H], tokens: [N] -> the dispatched rows [N, H]."""
    return x[tokens]
