"""Helpers for the elasticity tests: new expert files, and a bounded concurrent load that
records what each request got (checked with `moefleet.testing.VersionedReference`).

# T = tokens, H = hidden, I = expert intermediate
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from moefleet.client import Client
from moefleet.cluster.spec import ModelSpec
from moefleet.experts.reference import ExpertWeights
from moefleet.testing import VersionedReference, expert_file, random_expert


@dataclass
class NewExpert:
    gate_row: torch.Tensor  # [H]
    bias: float | None
    weights: ExpertWeights
    data: bytes  # the safetensors file AddExpert takes

    def record(self, ref: VersionedReference, version: int, layer: int, expert: int,
               group: int = 0) -> None:
        """Tell `ref` this expert exists from `version` on."""
        ref.added(version, layer, expert, self.gate_row, self.weights, self.bias, group)


def new_expert(spec: ModelSpec, seed: int, scale: float = 1.0) -> NewExpert:
    """A random expert for `spec`; `scale` grows its gate row so tokens pick it often."""
    row, bias, w = random_expert(spec, seed, scale)
    return NewExpert(row, bias, w, expert_file(row, w, bias))


@dataclass
class LoadResult:
    # (layer, x, y, version) of every answer, and every failure
    answers: list[tuple[int, torch.Tensor, torch.Tensor, int]] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    times: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds) of answers


def run_load(address: str, spec: ModelSpec, stop: threading.Event, threads: int = 4,
             max_requests: int = 4000, max_s: float = 120.0, make_x=None, retries: int = 0,
             timeout_s: float = 60.0) -> tuple[LoadResult, list]:
    """Start `threads` clients sending requests of 1..16 tokens to random layers until `stop`
    is set, `max_requests` are sent or `max_s` passes; each request has a deadline of
    timeout_s, and the client retries UNAVAILABLE `retries` times within it. Returns the
    result (filled as they run) and the threads to join."""
    result, lock = LoadResult(), threading.Lock()
    deadline = time.monotonic() + max_s
    per_thread = max_requests // threads

    def client(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with Client(address, retries=retries) as c:
            for _ in range(per_thread):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                layer = spec.layers[int(torch.randint(len(spec.layers), (1,), generator=g))]
                t = int(torch.randint(1, 17, (1,), generator=g))
                x = (make_x or _randn)(t, spec.moe.hidden_size, g)
                t0 = time.monotonic()
                try:
                    y, version = c.infer_with_version(spec.name, layer, x, timeout_s=timeout_s)
                except Exception as e:  # every failure is counted, none is expected
                    with lock:
                        result.errors.append(e)
                    continue
                with lock:
                    result.answers.append((layer, x, y, version))
                    result.times.append((t0, time.monotonic() - t0))

    workers = [threading.Thread(target=client, args=(1000 + i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    return result, workers


def _randn(t: int, h: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(t, h, generator=g)


def wrong_answers(result: LoadResult, ref: VersionedReference) -> list[tuple[int, int]]:
    """(index, version) of every answer that differs from its version's reference."""
    bad = []
    for i, (layer, x, y, version) in enumerate(result.answers):
        try:
            torch.testing.assert_close(y, ref(version, layer, x))
        except AssertionError:
            bad.append((i, version))
    return bad


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2):
    """Poll `predicate` until it returns something truthy; that value, or None on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return None
