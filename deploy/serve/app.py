"""moefleet as a Ray Serve application: Serve runs the lifecycle, never the per-layer hot path.

    serve deploy deploy/serve/moefleet.yaml      # to a running cluster (KubeRay: RayService)
    serve run deploy/serve/moefleet.yaml         # the same, in the foreground

One deployment, `MoefleetService`, one replica. Its constructor brings moefleet up on the Ray
cluster Serve runs on (`cluster.service.start`: Controller, expert hosts, the Router and its
gRPC server on `port`); `check_health` raises unless the Controller answers and the Router's
gRPC server is ready, so `serve status` and KubeRay see an unhealthy moefleet. Clients send
MoE layers straight to that gRPC port. Serve's HTTP route only answers the status:

    GET /moefleet  ->  {"address": "10.0.0.5:50051", "models": [...], "hosts": [...]}

Lifetimes. moefleet's actors are detached: they outlive the replica that started them.
- Serve deletes the application (`serve delete`, `serve shutdown`, the RayService is deleted):
  the replica's `__del__` finds the application DELETING (or Serve gone) and shuts moefleet
  down (routers drain, then hosts, routers and the Controller end).
- Serve replaces the replica (it crashed, failed its health check, or a new config rolls
  out): `__del__` leaves moefleet running. The next replica adopts it if it was started with
  the same arguments and its Router answers; otherwise it shuts the remains down and starts
  afresh. The arguments' fingerprint and the gRPC address are kept in Ray's KV store.
- A moefleet started another way (`moefleet serve`) is never adopted or stopped: the replica
  fails to start and says so.

Args (`args:` in the Serve config): `spec` (an inline model spec) or `spec_path` (a spec file,
read where Serve builds the application), `port` (50051; 0 picks a free one), `host`
("0.0.0.0"), `token` (the admin token; without it, $MOEFLEET_TOKEN in the replica's
environment), `insecure` (false: beyond loopback, moefleet does not start without a token).
The HTTP route asks for the same token, as `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import grpc
import ray
from ray import serve
from ray.experimental import internal_kv
from ray.serve import Application
from ray.serve.schema import ApplicationStatus
from starlette.requests import Request
from starlette.responses import JSONResponse

from moefleet.client import Client
from moefleet.cluster import service
from moefleet.cluster.service import CONTROLLER_NAME, NAMESPACE, ROUTER_NAME, Service
from moefleet.cluster.spec import ModelSpec, load_spec

__all__ = ["MoefleetService", "ServeArgs", "build", "fingerprint"]

log = logging.getLogger("ray.serve")  # Serve's logger: lands in the replica's log file
_RECORD_KEY = "moefleet-serve"  # Ray KV (namespace NAMESPACE): {"fingerprint", "address"}
_ARG_NAMES = ("spec", "spec_path", "port", "host", "token", "insecure")
_PROBE_TIMEOUT_S = 5.0
_GRACE_S = 5.0  # how long the Router drains in-flight requests on shutdown


# ---- arguments --------------------------------------------------------------------------------


@dataclass
class ServeArgs:
    spec: ModelSpec
    port: int = 50051
    host: str = "0.0.0.0"
    token: str | None = None
    insecure: bool = False

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ServeArgs:
        unknown = sorted(set(args) - set(_ARG_NAMES))
        if unknown:
            raise ValueError(f"moefleet args: unknown {unknown}; known: {list(_ARG_NAMES)}")
        if ("spec" in args) == ("spec_path" in args):
            raise ValueError("moefleet args: give exactly one of `spec` (inline) or `spec_path`")
        spec = ModelSpec.from_dict(args["spec"]) if "spec" in args else load_spec(args["spec_path"])
        return cls(spec, int(args.get("port", 50051)), str(args.get("host", "0.0.0.0")),
                   args.get("token") or None, bool(args.get("insecure", False)))


def fingerprint(args: ServeArgs, token: str | None) -> str:
    """What a running moefleet must have been started with to be adopted."""
    plain = {"spec": args.spec.to_dict(), "port": args.port, "host": args.host, "token": token}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def build(args: dict[str, Any]) -> Application:
    """The application builder Serve calls with the config's `args`."""
    return MoefleetService.bind(ServeArgs.from_dict(args))


# ---- the deployment ---------------------------------------------------------------------------


@serve.deployment(
    num_replicas=1,  # moefleet is one service per Ray cluster; a second replica would adopt it
    ray_actor_options={"num_cpus": 0.1},  # it only starts, probes and stops moefleet
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=60,  # room for __del__ to drain the Router and end the hosts
)
class MoefleetService:
    def __init__(self, args: ServeArgs):
        self._app = serve.get_replica_context().app_name
        self._token = args.token or os.environ.get("MOEFLEET_TOKEN") or None
        self._svc = _adopt_or_start(args, self._token)
        self._client = Client(self._svc.address, retries=0)

    def address(self) -> str:
        """HOST:PORT of moefleet's gRPC server, where clients send MoE layers."""
        return self._svc.address

    async def status(self) -> dict[str, Any]:
        return {"address": self._svc.address, **await self._svc.controller.status.remote()}

    async def __call__(self, request: Request) -> Any:
        if self._token:  # as the admin API: none is 401 (UNAUTHENTICATED), a wrong one 403
            given = request.headers.get("authorization")
            if not given:
                return JSONResponse({"error": "needs `Authorization: Bearer <admin token>`"}, 401)
            if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
                return JSONResponse({"error": "the admin token does not match"}, 403)
        return await self.status()

    async def check_health(self) -> None:
        """Raise, so Serve marks the replica UNHEALTHY and replaces it, unless the Controller
        answers and the Router's gRPC server says it is ready."""
        await asyncio.wait_for(self._svc.controller.model_names.remote(), _PROBE_TIMEOUT_S)
        if not await asyncio.to_thread(self._client.ready, _PROBE_TIMEOUT_S):
            raise RuntimeError(f"moefleet's gRPC server at {self._svc.address} is not ready")

    def __del__(self):
        # Serve calls this once when it stops the replica; Python may call it again.
        svc, self._svc = getattr(self, "_svc", None), None
        if svc is None:
            return
        self._client.close()
        if _application_deleted(self._app):
            log.info("application %r deleted: shutting moefleet down", self._app)
            _shut_down(svc.controller)
            internal_kv._internal_kv_del(_RECORD_KEY, namespace=NAMESPACE)
        else:
            log.info("replica replaced: moefleet keeps serving at %s", svc.address)


# ---- bring-up, adoption and shutdown ----------------------------------------------------------


def _adopt_or_start(args: ServeArgs, token: str | None) -> Service:
    want = fingerprint(args, token)
    controller = _actor(CONTROLLER_NAME)
    if controller is not None:
        record = _read_record()
        if record is None:
            raise RuntimeError(
                f"a moefleet service that this Serve application did not start already runs on "
                f"this Ray cluster (actor {CONTROLLER_NAME!r}); stop it (`moefleet shutdown`) first")
        router = _actor(ROUTER_NAME.format(0))
        address = record["address"]
        if record["fingerprint"] == want and router is not None and address and _answers(address):
            log.info("adopting the running moefleet service at %s", address)
            host, port = address.rsplit(":", 1)
            return Service(controller, [router], host, int(port))
        log.warning("replacing the moefleet service at %s: other arguments, or not answering", address)
        _shut_down(controller)
    # Recorded before starting, so a replica lost mid-start leaves remains a successor replaces.
    _write_record({"fingerprint": want, "address": None})
    svc = service.start(args.spec, port=args.port, host=args.host, detached=True, token=token,
                        insecure=args.insecure)
    _write_record({"fingerprint": want, "address": svc.address})
    log.info("moefleet serving %s on %s", args.spec.name, svc.address)
    return svc


def _shut_down(controller: Any) -> None:
    """moefleet's own Shutdown (the routers drain, then hosts, routers and the Controller end),
    waited for; the Controller and Router are killed if they have not ended by then."""
    try:
        ray.get(controller.shutdown_service.remote(grace_s=_GRACE_S), timeout=10)
    except ray.exceptions.RayError as e:  # also the timeout
        log.warning("moefleet's Controller did not take the shutdown: %s", e)
    deadline = time.monotonic() + _GRACE_S + 20
    while _actor(CONTROLLER_NAME) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    for actor in (_actor(ROUTER_NAME.format(0)), controller):
        if actor is not None:
            ray.kill(actor, no_restart=True)


def _application_deleted(app: str) -> bool:
    """Is Serve deleting the application (or shutting down), rather than replacing a replica?"""
    try:
        state = serve.status().applications.get(app)
    except Exception:  # Serve's controller is gone: Serve is shutting down
        return True
    return state is None or state.status == ApplicationStatus.DELETING


def _answers(address: str) -> bool:
    try:
        with Client(address, retries=0) as c:
            return c.ready(timeout_s=_PROBE_TIMEOUT_S)
    except grpc.RpcError:
        return False


def _actor(name: str) -> Any:
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def _read_record() -> dict[str, Any] | None:
    raw = internal_kv._internal_kv_get(_RECORD_KEY, namespace=NAMESPACE)
    return None if raw is None else json.loads(raw)


def _write_record(record: dict[str, Any]) -> None:
    internal_kv._internal_kv_put(_RECORD_KEY, json.dumps(record), overwrite=True, namespace=NAMESPACE)
