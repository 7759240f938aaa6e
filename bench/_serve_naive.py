"""The naive Ray Serve composition of one MoE layer: the baseline `bench/service.py` measures.

    client ──gRPC──► Serve's gRPC proxy ──handle──► NaiveRouter (gating, one call per expert)
                                                      ──handle──► NaiveExpert e (SwiGLU)

This is what a user would build with Serve's own parts: Serve's gRPC ingress with
moefleet's Open Inference Protocol protos, a router deployment that gates with
`moefleet.router.gating.route`, and one deployment per expert, reached through
DeploymentHandles, running `moefleet.experts.reference.swiglu`. The maths is the service's
and the reference's; only the plumbing differs. Serve's defaults are kept otherwise.

# T = tokens, H = hidden, K = experts per token, E = routed experts
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from ray import serve

from moefleet.cluster.model import gate_of, source_of
from moefleet.cluster.spec import ModelSpec
from moefleet.experts.reference import swiglu
from moefleet.protos.oip import decode_infer, encode_infer
from moefleet.router.gating import route

__all__ = ["APP_NAME", "SERVICER_FUNCTION", "start", "stop"]

APP_NAME = "moefleet-naive"
# Serve's proxy imports this by name: it must be importable where the proxy runs.
SERVICER_FUNCTION = "moefleet.protos.inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"


@serve.deployment
class NaiveExpert:
    """One routed expert of one layer; makes its own (deterministic) weights."""

    def __init__(self, spec: ModelSpec, layer: int, expert: int):
        self.w = source_of(spec).expert(layer, expert)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, H] -> [n, H]"""
        return swiglu(x, self.w.w1, self.w.w2, self.w.w3)


@serve.deployment
class NaiveRouter:
    """The gRPC ingress: decode, gate, one handle call per chosen expert, combine, encode."""

    def __init__(self, spec: ModelSpec, experts: dict[int, list[Any]]):
        self.cfg = spec.moe
        self.gates = {L: gate_of(spec, L) for L in spec.layers}
        self.experts = experts  # layer -> [DeploymentHandle per expert id]

    async def ModelInfer(self, request):  # noqa: N802 (the gRPC method name)
        call = decode_infer(request)
        x = call.x  # [T, H]
        topk_w, topk_ids = route(x, self.gates[call.layer], self.cfg)  # [T, K], [T, K]
        picks = []
        for e in topk_ids.unique().tolist():  # a loop over experts, the way a user writes it
            tok, k = torch.nonzero(topk_ids == e, as_tuple=True)
            picks.append((tok, k, self.experts[call.layer][e].remote(x[tok])))
        ys = await asyncio.gather(*(resp for _, _, resp in picks))
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)  # [T, H]
        for (tok, k, _), y in zip(picks, ys, strict=True):
            out.index_add_(0, tok, y.float() * topk_w[tok, k, None])
        return encode_infer(call, out, {"routing_version": 0})


def start(spec: ModelSpec, grpc_port: int, http_port: int, expert_num_cpus: float,
          router_num_cpus: float) -> str:
    """Start Serve and the app; returns the gRPC address. Ray must already be initialised.
    HTTP listens on 127.0.0.1; Serve's gRPC proxy always binds [::] (no host option)."""
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
    )
    experts = {
        L: [NaiveExpert.options(name=f"expert-{L}-{e}",
                                ray_actor_options={"num_cpus": expert_num_cpus}).bind(spec, L, e)
            for e in range(spec.moe.n_routed_experts)]
        for L in spec.layers
    }
    app = NaiveRouter.options(ray_actor_options={"num_cpus": router_num_cpus}).bind(spec, experts)
    serve.run(app, name=APP_NAME)
    return f"127.0.0.1:{grpc_port}"


def stop() -> None:
    serve.shutdown()
