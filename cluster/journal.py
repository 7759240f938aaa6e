"""The Controller's state journal: its registry as one msgpack snapshot, rewritten atomically
after every change, so that a restarted Controller loses nothing.

The snapshot holds plain data only (specs as dicts, replica and host records, the weight
files of experts added at runtime). Weights that the spec's source can make again are not
stored. Its top-level parts have owners (the Controller: models and policy; the executor:
hosts, routers, the data-plane secret, and the model a change touched), and each owner
`update`s its own parts, the others staying as last written. Knows nothing of what the
records mean.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack

__all__ = ["Journal"]

_FORMAT = 1


class Journal:
    """`state_dir/registry.msgpack` plus the weight files of added experts beside it."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "registry.msgpack"
        self._state: dict[str, Any] = {}  # the last snapshot saved or loaded

    def save(self, state: dict[str, Any]) -> None:
        """Write the snapshot to a temporary file, fsync it, then rename it into place. Only
        the owner may read it: it holds the data plane's internal secret."""
        self._state = state
        tmp = self.path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(msgpack.packb({"format": _FORMAT, "state": state}, use_bin_type=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def update(self, entries: dict[str, dict[Any, Any]] | None = None, **parts: Any) -> None:
        """Save the snapshot with `parts` replaced and `entries` set inside their parts (e.g.
        {"models": {name: record}}: one entry of a part that maps names to records); every
        other part and entry stays as last saved or loaded."""
        state = {**self._state, **parts}
        for part, items in (entries or {}).items():
            state[part] = {**state.get(part, {}), **items}
        self.save(state)

    def load(self) -> dict[str, Any] | None:
        """The last snapshot, or None when there is none."""
        if not self.path.exists():
            return None
        data = msgpack.unpackb(self.path.read_bytes(), raw=False, strict_map_key=False)
        if data.get("format") != _FORMAT:
            raise ValueError(f"{self.path}: journal format {data.get('format')}, expected {_FORMAT}")
        self._state = data["state"]
        return self._state

    def write_blob(self, name: str, data: bytes) -> str:
        """Store a file (e.g. an added expert's safetensors) beside the snapshot; its path."""
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return str(path)

    def clear(self) -> None:
        """Forget everything: a fresh service starts from its spec, not from an old run."""
        self._state = {}
        for p in self.dir.iterdir():
            if p.is_file():
                p.unlink()
