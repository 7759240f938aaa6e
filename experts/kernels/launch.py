"""Launch settings for the Triton grouped SwiGLU: a small table read from JSON, and a default.

The table lives in `launch_configs.json` next to this file and is written by
`bench/tune_kernels.py`. Each record is keyed by (E, H, I, dtype, device name) and by the
row count it was tuned at; a lookup picks the matching record whose row count is nearest
(log scale) to the call's, so one key can hold a decode and a prefill setting.

This module knows nothing of Triton or CUDA: it maps plain keys to plain numbers, so it
imports anywhere and is unit-tested without a GPU.

# N = rows, H = hidden, I = intermediate, E = local experts
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

__all__ = ["LaunchConfig", "TunedEntry", "TABLE_PATH", "default_config", "load_table", "pick"]

TABLE_PATH = Path(__file__).with_name("launch_configs.json")


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch knobs shared by the gate/up and the down kernel.

    block_m tiles the rows of one expert (both kernels use the same row blocks); block_n
    tiles I in the gate/up kernel and H in the down kernel; block_k is the reduction step.
    All three are powers of two and at least 16 (the smallest `tl.dot` tile). group_m row
    blocks are walked down a column of tiles together, for L2 reuse."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.group_m < 1:
            raise ValueError(f"group_m must be >= 1, got {self.group_m}")


@dataclass(frozen=True)
class TunedEntry:
    """One record of the JSON table, field for field."""

    device: str
    dtype: str  # "bfloat16", "float16" or "float32"
    E: int
    H: int
    I: int  # noqa: E741 - the intermediate size, named as everywhere else in this package
    rows: int  # the N it was tuned at
    config: LaunchConfig

    @classmethod
    def from_json(cls, d: dict) -> TunedEntry:
        return cls(**{**d, "config": LaunchConfig(**d["config"])})

    def to_json(self) -> dict:
        return asdict(self)


# ---- default ----------------------------------------------------------------------------

# With few rows per expert (decode), a 64-row block is mostly padding; 16 is the smallest
# tile `tl.dot` takes, and one more pipeline stage keeps the weight stream busy. Both
# defaults stay under ~100 KB of shared memory, so they launch on consumer GPUs too.
_FEW_ROWS_PER_EXPERT = 16


def default_config(n_rows: int, n_experts: int) -> LaunchConfig:
    """A setting that is reasonable on any recent NVIDIA GPU when the table has no record."""
    if n_rows <= _FEW_ROWS_PER_EXPERT * max(n_experts, 1):
        return LaunchConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=4)
    return LaunchConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)


# ---- table ------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def load_table(path: Path = TABLE_PATH) -> tuple[TunedEntry, ...]:
    """Read the table; a missing file is an empty table (the defaults then apply)."""
    if not path.exists():
        return ()
    raw = json.loads(path.read_text())
    known = {f.name for f in fields(TunedEntry)}
    return tuple(TunedEntry.from_json({k: v for k, v in r.items() if k in known})
                 for r in raw.get("configs", []))


def pick(
    E: int, H: int, I: int, dtype: str, device: str, n_rows: int,  # noqa: E741
    table: tuple[TunedEntry, ...] | None = None,
) -> LaunchConfig:
    """The tuned setting for this key whose row count is nearest to n_rows, else the default."""
    table = load_table() if table is None else table
    key = (device, dtype, E, H, I)
    hits = [t for t in table if (t.device, t.dtype, t.E, t.H, t.I) == key]
    if not hits:
        return default_config(n_rows, E)
    scale = math.log2(max(n_rows, 1))
    return min(hits, key=lambda t: abs(math.log2(max(t.rows, 1)) - scale)).config
