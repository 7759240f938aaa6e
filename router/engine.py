"""The router's request path for one MoE layer: gate, plan, fan out, combine.

`Engine.forward` is the whole hot path. It captures the model's current `ModelState` (one
routing-table version) once, so a request runs on the version it started with, even while a
new version is installed. Hosts are reached through an injected `call_host` coroutine, so
the engine runs against Ray actors in the service and against plain objects in tests.

Across requests the engine keeps what the hot path learns: rows outstanding per host (the
plan sends rows to the least-loaded replicas), hosts found dead (a call raised `HostGone`;
their rows are retried on other replicas of the same version), requests in flight per
version (so a caller can wait for old versions to drain), and rows routed per expert.

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

from moefleet.cluster.spec import MoEConfig
from moefleet.experts.reference import SharedExperts

from .dispatch import HostBatch, LayerTable, combine, plan
from .errors import HostGone, InvalidArgument, NotFound, Unavailable, quote
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
    host_ids: list[str]  # parallel to hosts: each host's id, the key of outstanding/dead_hosts

    def __post_init__(self):
        if len(self.host_ids) != len(self.hosts):
            raise ValueError(f"{len(self.hosts)} hosts but {len(self.host_ids)} host ids")


@dataclass(frozen=True)
class _Job:
    """One host call: rows x go to hosts[host] as `batch`; their results land at y[pos]."""

    host: int
    pos: slice | torch.Tensor  # its rows among the request's: a range at first, [n] on retry
    x: torch.Tensor  # [n, H]
    batch: HostBatch


class Engine:
    """Serves forward passes for the installed models.

    outstanding: host id -> rows sent to it and not yet answered, over all requests and
    models (hosts with none are absent). dead_hosts: ids of hosts whose call raised
    HostGone; plans avoid them until a newly installed state no longer lists them.
    on_host_gone(host_id) is called once per newly dead host; it must not block.
    """

    def __init__(self, call_host: CallHost, device: str = "auto",
                 on_host_gone: Callable[[str], None] | None = None):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._call_host = call_host
        self._on_host_gone = on_host_gone
        self._models: dict[str, ModelState] = {}
        self.outstanding: dict[str, int] = {}
        self.dead_hosts: set[str] = set()
        self._running: dict[tuple[str, int], int] = {}  # (model, version) -> requests
        self._drain_waiters: set[asyncio.Event] = set()
        self._load: dict[tuple[str, int], torch.Tensor] = {}  # (model, layer) -> [X] rows
        self._live: dict[tuple[str, int, int, frozenset[int]], LayerTable] = {}

    def install(self, state: ModelState) -> None:
        """Swap in a new version; requests already running keep the one they captured.
        Dead hosts that no installed state lists any more are forgotten."""
        layers = {
            i: LayerState(ls.gate.to(self.device), ls.table, _to_device(ls.shared, self.device))
            for i, ls in state.layers.items()
        }
        self._models[state.name] = replace(state, layers=layers)
        self.dead_hosts &= {h for st in self._models.values() for h in st.host_ids}
        self._live = {key: t for key, t in self._live.items() if key[0] != state.name}

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def state(self, model: str) -> ModelState:
        try:
            return self._models[model]
        except KeyError:
            raise NotFound(f"unknown model {quote(model)}; serving {sorted(self._models)}") from None

    def check(self, model: str, layer: int, x: torch.Tensor) -> None:
        """Raise the right domain error for a request this engine cannot serve."""
        self._check(self.state(model), layer, x)

    def _check(self, st: ModelState, layer: int, x: torch.Tensor) -> None:
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
        """x: [T, H] -> (y [T, H] in x's dtype, routing version used)."""
        st = self.state(model)  # the version this request runs on
        with self._in_flight(model, st.version):
            self._check(st, layer, x)
            ls = st.layers[layer]
            if x.shape[0] == 0:
                return x.clone(), st.version
            xd = x.to(self.device)
            big = x.shape[0] >= _OFFLOAD_TOKENS
            topk_w, topk_ids = await _pure(big, route, xd, ls.gate, st.cfg)  # [T, K], [T, K]
            ids = topk_ids.reshape(-1).cpu()  # [N]
            gone: set[int] = set()  # host indices that failed during this request
            try:
                p = plan(topk_ids, self._live_table(st, layer, gone), self._host_load(st))
            except LookupError as e:  # an expert with no ready replica in this version
                raise Unavailable(str(e)) from e
            self._count(model, layer, ids)
            rows = await _pure(big, _gather, x.to(st.dtype), p.tokens(st.cfg.num_experts_per_tok))
            y = torch.empty(rows.shape, dtype=torch.float32, device=self.device)  # [N, H]
            jobs = [_Job(b.host, slice(b.start, b.end), rows[b.start:b.end], b) for b in p.batches]
            shared = lambda: _pure(big, self._shared, xd, ls.shared)  # noqa: E731
            out, failed = await self._run(st, jobs, y, gone, shared)
            while failed.numel():  # each round loses >= 1 host, so this ends
                jobs = self._replan(st, layer, ids[p.order[failed]], failed, rows, gone)
                _, failed = await self._run(st, jobs, y, gone)
            out = await _pure(big, combine, y, p, topk_w, x.shape[0], out)
            return out.to(x.dtype).cpu(), st.version

    async def _run(self, st: ModelState, jobs: list[_Job], y: torch.Tensor, gone: set[int],
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
                gone.add(j.host)
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

    def _replan(self, st: ModelState, layer: int, e: torch.Tensor, pos: torch.Tensor,
                rows: torch.Tensor, gone: set[int]) -> list[_Job]:
        """e, pos: [M] expert id and position of each row whose host is gone -> jobs that
        send them to the live replicas of the same experts (same version)."""
        try:
            q = plan(e[:, None], self._live_table(st, layer, gone), self._host_load(st))
        except LookupError as err:
            dead = sorted(st.host_ids[i] for i in gone)
            raise Unavailable(f"expert host(s) {dead} gone and {err}") from err
        pos = pos[q.order]  # [M] in the new plan's order
        return [_Job(b.host, pos[b.start:b.end], rows[pos[b.start:b.end]], b)
                for b in q.batches]

    def _issue(self, st: ModelState, job: _Job) -> asyncio.Future:
        """Start one host call now; its rows count as outstanding until it settles."""
        host_id, n = st.host_ids[job.host], job.x.shape[0]
        self.outstanding[host_id] = self.outstanding.get(host_id, 0) + n
        try:
            call = asyncio.ensure_future(self._call_host(st.hosts[job.host], job.x, job.batch))
        except Exception as e:  # raised before returning: settle it like a failed call
            call = asyncio.get_running_loop().create_future()
            call.set_exception(e)
        call.add_done_callback(lambda _: self._settle(host_id, n))
        return call

    def _settle(self, host_id: str, n: int) -> None:
        left = self.outstanding[host_id] - n
        if left:
            self.outstanding[host_id] = left
        else:
            del self.outstanding[host_id]

    def _mark_dead(self, host_id: str) -> None:
        if host_id not in self.dead_hosts:
            self.dead_hosts.add(host_id)
            if self._on_host_gone is not None:
                self._on_host_gone(host_id)

    def _host_load(self, st: ModelState) -> torch.Tensor:
        """[S] rows outstanding at each of the state's hosts."""
        return torch.tensor([self.outstanding.get(h, 0) for h in st.host_ids], dtype=torch.long)

    def _live_table(self, st: ModelState, layer: int, gone: set[int]) -> LayerTable:
        """The layer's table without the dead hosts (and those this request saw fail)."""
        dead = frozenset(gone | {i for i, h in enumerate(st.host_ids) if h in self.dead_hosts})
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
    def _in_flight(self, model: str, version: int) -> Iterator[None]:
        key = (model, version)
        self._running[key] = self._running.get(key, 0) + 1
        try:
            yield
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]
                for ev in self._drain_waiters:
                    ev.set()

    async def wait_drained(self, model: str, version: int, timeout_s: float) -> bool:
        """True once no request of `model` runs on a version older than `version` (at once
        if none does); False if some still does after timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(m == model and v < version for m, v in self._running):
            left = deadline - loop.time()
            if left <= 0:
                return False
            ev = asyncio.Event()  # one per wait, so the engine is bound to no event loop
            self._drain_waiters.add(ev)
            try:
                await asyncio.wait_for(ev.wait(), left)
            except asyncio.TimeoutError:
                pass  # the loop condition decides
            finally:
                self._drain_waiters.discard(ev)
        return True

    # ---- per-expert load ---------------------------------------------------------------

    def _count(self, model: str, layer: int, ids: torch.Tensor) -> None:
        """ids: [N] routed expert ids, added into the (model, layer) accumulator [X]."""
        acc = self._load.get((model, layer), torch.zeros(0, dtype=torch.long))
        n = torch.bincount(ids, minlength=acc.numel())  # [X'] with X' >= X
        if n.numel() > acc.numel():
            acc = torch.cat([acc, acc.new_zeros(n.numel() - acc.numel())])
        self._load[(model, layer)] = acc.add_(n)

    def take_load(self) -> dict[str, dict[int, dict[int, int]]]:
        """{model: {layer: {expert id: rows routed}}} since the previous call (non-zero
        entries only); starts counting afresh."""
        load, self._load = self._load, {}
        out: dict[str, dict[int, dict[int, int]]] = {}
        for (model, layer), acc in load.items():
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


def _gather(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """x: [T, H], tokens: [N] -> the dispatched rows [N, H]."""
    return x[tokens]
