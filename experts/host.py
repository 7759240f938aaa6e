"""ExpertHost: holds expert weights in slots and runs one batch of rows for many experts.

A plain class; the cluster wraps it with `ray.remote` (so it also runs without Ray, e.g. on a
GPU machine for kernel work). Its Ray methods (`load_weights`, `load_weights_from`, `free`,
`run`) take keyword arguments only. Weights live stacked in the grouped kernel's layout,
w13 [S, 2I, H] and w2 [S, H, I], so `run` is a single grouped kernel call with no copying.

Knows nothing of gating, routing tables or gRPC.

# S = slots, N = rows, H = hidden, I = expert intermediate
"""

from __future__ import annotations

import itertools
import json
import math
import socket
import warnings
from typing import Any

import numpy as np
import torch

from .hf_config import CheckpointError
from .kernels import grouped_swiglu
from .reference import ExpertWeights
from .weights import source_from

__all__ = ["ExpertHost", "to_wire", "from_wire"]


def to_wire(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A CPU tensor as a numpy array Ray can pass zero-copy (bf16 travels as int16 bits)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), "bfloat16"
    return t.numpy(), str(t.dtype).removeprefix("torch.")


def from_wire(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of `to_wire`. Arrays read from the object store are read-only views; the
    tensor shares their memory (no copy) and callers only ever read from it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class ExpertHost:
    def __init__(
        self,
        host_id: str,
        num_slots: int,
        num_cpus: float = 1,
        device: str = "auto",
        kernel_backend: str = "auto",
    ):
        # Ray sets OMP threads to the actor's num_cpus; say what we mean instead of inheriting.
        torch.set_num_threads(max(1, math.ceil(num_cpus)))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.host_id = host_id
        self.device = torch.device(device)
        self.num_slots = num_slots
        self.kernel_backend = kernel_backend
        self.slots: dict[int, tuple[int, int]] = {}  # slot -> (layer, expert)
        self.w13: torch.Tensor | None = None  # [S, 2I, H]
        self.w2: torch.Tensor | None = None  # [S, H, I]
        self._sources: dict[str, Any] = {}  # weight sources by their description

    # ---- loading -----------------------------------------------------------------------

    def load_weights(self, *, slot: int, layer: int, expert: int, weights: ExpertWeights) -> None:
        """Put one expert's weights into `slot` (tensors arrive through the object store)."""
        self._check_slot(slot)
        if self.w13 is None:
            self._allocate(weights)
        w1, w2, w3 = (w.to(self.device, self.w13.dtype) for w in (weights.w1, weights.w2, weights.w3))
        inter = self.w2.shape[2]
        want = {"w1": (inter, self.w2.shape[1]), "w2": tuple(self.w2.shape[1:]),
                "w3": (inter, self.w2.shape[1])}
        got = {"w1": tuple(w1.shape), "w2": tuple(w2.shape), "w3": tuple(w3.shape)}
        if got != want:
            raise ValueError(f"host {self.host_id}: expert ({layer}, {expert}) has shapes {got}; "
                             f"its slots hold {want}")
        self.w13[slot, :inter] = w1
        self.w13[slot, inter:] = w3
        self.w2[slot] = w2
        self.slots[slot] = (layer, expert)

    def load_weights_from(self, *, slot: int, layer: int, expert: int, source: dict[str, Any]) -> None:
        """Load from a weight source described as data (`weights.source_from`); the host reads
        only this expert. A checkpoint it cannot read is a CheckpointError naming this host."""
        key = json.dumps(source, sort_keys=True)
        if key not in self._sources:  # keeps a checkpoint's tensor index between loads
            self._sources[key] = source_from(source)
        try:
            w = self._sources[key].expert(layer, expert)
        except CheckpointError as e:
            raise CheckpointError(f"host {self.host_id} on {socket.gethostname()}: {e}") from None
        self.load_weights(slot=slot, layer=layer, expert=expert, weights=w)

    def free(self, *, slot: int) -> None:
        self.slots.pop(slot, None)

    # ---- compute -----------------------------------------------------------------------

    def run(self, *, x: np.ndarray, dtype: str, slot_ids: list[int], counts: list[int]) -> tuple:
        """The Ray call: `compute` on wire arrays (see `to_wire`) -> y as a wire array."""
        return to_wire(self.compute(from_wire(x, dtype), slot_ids, counts))

    def compute(self, x: torch.Tensor, slot_ids: list[int], counts: list[int]) -> torch.Tensor:
        """x: [N, H] rows sorted by slot; slot_ids[i] receives counts[i] rows -> y: [N, H] in
        x's dtype, on the CPU."""
        missing = [s for s in slot_ids if s not in self.slots]
        if missing:
            raise LookupError(f"host {self.host_id}: slot(s) {missing} hold no expert")
        xt = x.to(self.device, self.w13.dtype)  # [N, H]
        per_slot = [0] * self.num_slots  # rows of each slot: a few ints, cheaper than torch ops
        for s, c in zip(slot_ids, counts, strict=True):
            per_slot[s] = c
        offsets = torch.tensor([0, *itertools.accumulate(per_slot)], device=self.device)  # [S+1]
        y = grouped_swiglu(xt, self.w13, self.w2, offsets, backend=self.kernel_backend)
        return y.to("cpu", x.dtype)

    def info(self) -> dict[str, Any]:
        return {"id": self.host_id, "device": str(self.device), "slots_total": self.num_slots,
                "slots_used": len(self.slots)}

    # ---- helpers -----------------------------------------------------------------------

    def _allocate(self, w: ExpertWeights) -> None:
        inter, h = w.w1.shape
        kw = {"dtype": w.w1.dtype, "device": self.device}
        # uninitialised: a slot is only ever read after `load_weights` wrote it (`run` checks), and
        # zeroing would touch every page once more before loading touches it again
        self.w13 = torch.empty(self.num_slots, 2 * inter, h, **kw)
        self.w2 = torch.empty(self.num_slots, h, inter, **kw)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"host {self.host_id}: slot {slot} outside 0..{self.num_slots - 1}")
