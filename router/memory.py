"""The router process's memory, as Linux reports it, and the two ways it gives memory back:
a full collection of what reference cycles hold, and glibc's `malloc_trim`.

Plain Python and ctypes: no Ray, so the unit tests import it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

__all__ = ["memory", "own_rss_bytes", "freeze_startup_objects", "malloc_trim"]

_STATUS_FIELDS = {"rss": "VmRSS", "anon": "RssAnon", "file": "RssFile", "shmem": "RssShmem"}


def memory(pid: int | str = "self") -> dict[str, int]:
    """A process's resident memory in bytes (this one's by default): "rss" in all, split into
    "anon" (private: the heap, the allocator's arenas, tensors), "file" (the code and libraries
    mapped) and "shmem" (pages of Ray's object store the process has touched: the store's
    memory, shared with it and reused for later objects); "own" is "rss" less "shmem"."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    kb = {k: int(fields[f].split()[0]) << 10 for k, f in _STATUS_FIELDS.items()}
    return {**kb, "own": kb["rss"] - kb["shmem"]}


def own_rss_bytes() -> int:
    return memory()["own"]


def freeze_startup_objects() -> None:
    """Move the objects alive once the router is up (modules, the engine's state: hundreds of
    thousands) out of the collector's sight. A full collection then looks only at what came
    after, so it is cheap, and Python starts one by itself whenever the objects that survived
    earlier collections have grown by a quarter: under load, request payloads held by reference
    cycles are freed every few hundred calls, not once the process has allocated as many
    objects again as it started with."""
    gc.collect()
    gc.freeze()
    gc.collect()  # a full collection of what is left resets the count that triggers the next


def malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
