"""Benchmark: the router's own CPU per request, in one process, with no transport and no maths.

One Mixtral-shaped layer (H=1024, E=8, K=2, fp32) on 2 hosts that answer at once: each host
call returns a view of a ready reply buffer, as the gRPC data plane receives its reply bytes.
What is timed (process CPU, all threads) is everything the Router itself does for a request:

    wire decode (`decode_infer`) → Engine.forward (gating, plan, gather the rows, encode
    each host's request, take the answers in, combine) → wire encode (`encode_infer`)

Prints the median CPU ms per request at T=4096 (and T=8), one torch thread, and the share
of each step from cProfile's cumulative times.

    .venv/bin/python bench/router_cpu.py

# T = tokens, H = hidden
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import statistics
import time

import torch

from moefleet.core.config import MoEConfig
from moefleet.experts.dataplane import decode_reply, encode_request
from moefleet.experts.weights import RandomSource
from moefleet.protos.oip import decode_infer, encode_infer, request_for
from moefleet.router import engine as engine_module
from moefleet.router.dispatch import HostBatch, LayerTable
from moefleet.router.engine import Engine, LayerState, ModelState
from moefleet.router.gating import Gate

H, E, K, LAYER = 1024, 8, 2, 0
STEPS = {  # label -> function name cProfile reports (cumulative)
    "wire decode": "decode_infer", "gating": "route", "plan": "plan", "gather": "_gather",
    "host request encode": "encode_request",
    "combine": "combine", "wire encode": "encode_infer",
}


def _engine() -> Engine:
    cfg = MoEConfig(hidden_size=H, moe_intermediate_size=1408, n_routed_experts=E,
                    num_experts_per_tok=K, norm_topk_prob=True)
    gw = RandomSource(seed=0, hidden_size=H, intermediate_size=16, n_routed_experts=E).gate(LAYER)
    gate = Gate(gw.weight, torch.arange(E), torch.zeros(E, dtype=torch.long), gw.bias)
    table = LayerTable.from_replicas({e: [(e % 2, e // 2)] for e in range(E)})
    reply = memoryview(bytes(8192 * K * H * 4))  # a ready answer, larger than any call's

    async def call_host(host, x: torch.Tensor, b: HostBatch) -> torch.Tensor:
        encode_request(x, b.slot_ids, b.counts)  # what the gRPC path sends
        return decode_reply(reply[:x.nbytes], x.dtype, tuple(x.shape))

    engine = Engine(call_host, "cpu")
    engine.install(ModelState("m", cfg, torch.float32, 1, {LAYER: LayerState(gate, table)},
                              ["h0", "h1"], ["h0", "h1"]))
    return engine


async def _serve(engine: Engine, request) -> None:
    call = decode_infer(request)
    y, version = await engine.forward(call.model, LAYER, call.x)
    encode_infer(call, y, {"routing_version": version})


async def cpu_ms(engine: Engine, t: int, n: int) -> float:
    request = request_for("m", LAYER, torch.randn(t, H))
    await _serve(engine, request)
    times = []
    for _ in range(n):
        c0 = time.process_time()
        await _serve(engine, request)
        times.append((time.process_time() - c0) * 1e3)
    return statistics.median(times)


async def shares(engine: Engine, t: int, n: int) -> dict[str, float]:
    """cProfile sees one thread: the steps run inline here (no worker-thread offload)."""
    request = request_for("m", LAYER, torch.randn(t, H))
    engine_module._OFFLOAD_TOKENS, offload = 1 << 30, engine_module._OFFLOAD_TOKENS
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        await _serve(engine, request)
    prof.disable()
    engine_module._OFFLOAD_TOKENS = offload
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    total = sum(tt for _, _, tt, _, _ in stats.values())
    cum = {}
    for (_, _, name), (_, _, _, ct, _) in stats.items():
        cum[name] = cum.get(name, 0.0) + ct
    return {label: cum.get(fn, 0.0) / total for label, fn in STEPS.items()}


async def main() -> None:
    torch.set_num_threads(1)
    engine = _engine()
    for t in (8, 4096):
        ms = await cpu_ms(engine, t, 40 if t > 8 else 400)
        print(f"T={t}: router CPU {ms:.3f} ms per request")
    print("shares of the T=4096 path (cProfile, cumulative; steps nest):")
    for label, share in (await shares(engine, 4096, 10)).items():
        print(f"  {label:<28} {share:6.1%}")


if __name__ == "__main__":
    asyncio.run(main())
