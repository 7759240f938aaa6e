"""The Controller: the registry of models, layers, experts, replicas and hosts, and the owner
of each model's routing-table version.

A plain class that the cluster runs as a named, detached Ray actor. Routers take their copy
of a model's state from `model_state`; every change bumps the version and is pushed to the
registered routers. No tensor maths here: gate weights are stored and handed on as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moefleet.router.errors import NotFound

from .spec import ModelSpec

__all__ = ["Controller", "HostRecord"]


@dataclass
class HostRecord:
    handle: Any
    info: dict[str, Any]  # id, node_id, node_ip, device, slots_total
    used: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # slot -> (model, L, e)


@dataclass
class _Model:
    spec: ModelSpec
    layers: dict[int, dict[str, Any]]  # layer -> {"gate": Gate, "shared": SharedExperts|None}
    replicas: dict[tuple[int, int], list[tuple[str, int]]] = field(default_factory=dict)
    version: int = 0


class Controller:
    def __init__(self):
        self._models: dict[str, _Model] = {}
        self._hosts: dict[str, HostRecord] = {}
        self._routers: list[Any] = []

    # ---- registry ----------------------------------------------------------------------

    def add_model(self, spec: ModelSpec, layers: dict[int, dict[str, Any]]) -> None:
        self._models[spec.name] = _Model(spec, layers)

    def add_host(self, host_id: str, handle: Any, info: dict[str, Any]) -> None:
        self._hosts[host_id] = HostRecord(handle, info)

    def add_replica(self, model: str, layer: int, expert: int, host_id: str, slot: int) -> None:
        """Record a replica whose slot is loaded and ready; it serves from the next publish."""
        m = self._model(model)
        self._hosts[host_id].used[slot] = (model, layer, expert)
        m.replicas.setdefault((layer, expert), []).append((host_id, slot))

    def publish(self, model: str) -> int:
        """Bump the model's routing-table version and push the new state to every router."""
        m = self._model(model)
        m.version += 1
        state = self.model_state(model)
        for r in self._routers:
            r.install.remote(state)
        return m.version

    def add_router(self, handle: Any) -> None:
        self._routers.append(handle)

    # ---- reads -------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def model_state(self, model: str) -> dict[str, Any]:
        """What a router needs for one version: spec, gates, shared experts, replicas by
        host index, and the host handles those indices refer to."""
        m = self._model(model)
        host_ids = sorted({h for reps in m.replicas.values() for h, _ in reps})
        index = {h: i for i, h in enumerate(host_ids)}
        replicas: dict[int, dict[int, list[tuple[int, int]]]] = {}
        for (layer, e), reps in m.replicas.items():
            replicas.setdefault(layer, {})[e] = [(index[h], s) for h, s in reps]
        return {
            "spec": m.spec,
            "version": m.version,
            "layers": m.layers,
            "replicas": replicas,
            "hosts": [self._hosts[h].handle for h in host_ids],
        }

    def hosts(self) -> dict[str, Any]:
        return {h: rec.handle for h, rec in self._hosts.items()}

    def status(self, model: str = "") -> dict[str, Any]:
        """The registry as plain data (what `moefleet status` shows)."""
        names = [model] if model else self.model_names()
        return {
            "models": [self._model_status(n) for n in names],
            "hosts": [
                {**rec.info, "slots_used": len(rec.used)} for _, rec in sorted(self._hosts.items())
            ],
        }

    def _model_status(self, name: str) -> dict[str, Any]:
        m = self._model(name)
        layers = []
        for layer in sorted(m.layers):
            experts = [
                {"expert": e, "replicas": [{"host": h, "slot": s} for h, s in reps]}
                for (L, e), reps in sorted(m.replicas.items()) if L == layer
            ]
            layers.append({"layer": layer, "experts": experts})
        return {"name": name, "routing_version": m.version, "dtype": m.spec.dtype,
                "hidden_size": m.spec.moe.hidden_size, "layers": layers}

    def _model(self, name: str) -> _Model:
        if name not in self._models:
            raise NotFound(f"unknown model {name!r}; serving {self.model_names()}")
        return self._models[name]
