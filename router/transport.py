"""How the router reaches an expert host: a Ray actor call, or a direct gRPC data-plane call.

    ray   host.run.remote(...) through Ray's object store: zero-copy on one node, but a fixed
          cost per call (scheduling, the object store round trip) of about 2 ms
    grpc  one unary call on a channel kept per host to its data-plane port (experts/dataplane.py),
          carrying the service's internal secret: well under 1 ms for decode-sized batches, but
          it copies the bytes through the socket, so it loses to Ray for large batches
    auto  gRPC for batches of at most `grpc_max_bytes`, Ray above

Both paths raise the same errors: `HostGone` when the host is gone for good (its Ray actor is
dead, or its data-plane port refuses or drops the call: UNAVAILABLE), so the engine retries the
rows on other replicas; a domain error, or `Unavailable`, for anything else.

Knows nothing of gating, plans or combine beyond the `HostBatch` it is handed. Imports Ray
only on the Ray path, so the gRPC path runs (and is tested) without it.

# n = rows sent to one host, H = hidden
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from moefleet.core.errors import HostGone, MoefleetError, Unavailable
from moefleet.experts.dataplane import GRPC_OPTIONS, RUN_METHOD, SECRET_KEY, decode_reply, encode_request
from moefleet.experts.host import from_wire, to_wire

from .dispatch import HostBatch

__all__ = ["HostLink", "Transport", "MODES"]

MODES = ("auto", "grpc", "ray")
_CLOSE_GRACE_S = 30.0  # a dropped host's channel: calls of older versions still draining on it
_GONE = {grpc.StatusCode.UNAVAILABLE}  # the host's port refused or dropped the call


@dataclass(frozen=True)
class HostLink:
    """One expert host as a router reaches it: its Ray handle, and its data-plane address
    ("HOST:PORT"; "" when it serves none) with the secret a call must carry."""

    handle: Any
    address: str = ""
    secret: str = ""


class Transport:
    """A `CallHost` for the engine: sends one host's rows by the path `mode` picks.

    mode: "auto" (gRPC up to grpc_max_bytes of rows, Ray above), "grpc" (gRPC whenever the
    host has a data-plane address) or "ray". Keeps one grpc.aio channel per host address.
    """

    def __init__(self, mode: str = "auto", grpc_max_bytes: int = 0):
        if mode not in MODES:
            raise ValueError(f"transport {mode!r}: expected one of {MODES}")
        self.mode = mode
        self.grpc_max_bytes = grpc_max_bytes
        self._channels: dict[str, tuple[grpc.aio.Channel, Any]] = {}  # address -> (channel, Run)
        self._closing: set[asyncio.Future] = set()

    def __call__(self, host: HostLink, x: torch.Tensor, b: HostBatch) -> Awaitable[torch.Tensor]:
        """Start the call now; the awaitable yields y [n, H] in x's dtype."""
        if self._use_grpc(host, x):
            return self._grpc(host, x, b)
        return call_ray(host.handle, x, b)

    def _use_grpc(self, host: HostLink, x: torch.Tensor) -> bool:
        if not host.address or self.mode == "ray":
            return False
        return self.mode == "grpc" or x.numel() * x.element_size() <= self.grpc_max_bytes

    def _grpc(self, host: HostLink, x: torch.Tensor, b: HostBatch) -> Awaitable[torch.Tensor]:
        if host.address not in self._channels:
            channel = grpc.aio.insecure_channel(host.address, options=GRPC_OPTIONS)
            # a registered method: the channel resolves the method name once, not per call
            self._channels[host.address] = channel, channel.unary_unary(
                RUN_METHOD, _registered_method=True)
        run = self._channels[host.address][1]
        call = run(encode_request(x, b.slot_ids, b.counts), metadata=((SECRET_KEY, host.secret),))
        return _receive_grpc(call, host.address, x.dtype, tuple(x.shape))

    def keep(self, addresses: Iterable[str], grace_s: float | None = _CLOSE_GRACE_S) -> None:
        """Close the channels of hosts no installed state lists any more. Calls still in flight
        on one (requests of an older version, draining) get grace_s to finish; a later call to
        the same address opens a new channel."""
        keep = set(addresses)
        for address in [a for a in self._channels if a not in keep]:
            closing = asyncio.ensure_future(self._channels.pop(address)[0].close(grace_s))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every channel now (the router has stopped serving)."""
        self.keep((), grace_s=None)
        await asyncio.gather(*self._closing)


async def _receive_grpc(call: Any, address: str, dtype: torch.dtype,
                        shape: tuple[int, int]) -> torch.Tensor:
    try:
        data = await call
    except grpc.aio.AioRpcError as e:
        if e.code() in _GONE:  # the engine retries the rows on other replicas
            raise HostGone(f"expert host at {address} is gone: {e.details()}") from e
        raise Unavailable(f"expert host at {address}: {e.code().name}: {e.details()}") from e
    return decode_reply(data, dtype, shape)


# ---- the Ray path -------------------------------------------------------------------------

def call_ray(handle: Any, x: torch.Tensor, b: HostBatch) -> Awaitable[torch.Tensor]:
    """Issue the Ray call now (so every host works while the router computes the shared
    experts); the returned awaitable collects and decodes the answer."""
    arr, dtype = to_wire(x)
    return _receive_ray(handle.run.remote(x=arr, dtype=dtype, slot_ids=b.slot_ids.tolist(),
                                          counts=b.counts.tolist()))


async def _receive_ray(ref: Any) -> torch.Tensor:
    from ray.exceptions import RayActorError, RayTaskError  # here: the gRPC path needs no Ray

    try:
        y, y_dtype = await ref
    except RayActorError as e:  # the engine retries the rows on other replicas
        raise HostGone(f"expert host is gone: {e}") from e
    except RayTaskError as e:
        cause = e.as_instanceof_cause()
        raise (cause if isinstance(cause, MoefleetError) else Unavailable(str(cause))) from e
    return from_wire(y, y_dtype)
