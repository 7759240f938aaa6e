"""The service's own packages never import `moefleet.testing`: the oracle the tests, benchmarks
and demo check the service against stays out of what it serves with. Read from the source
(ast), so no module is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ["client", "cluster", "experts", "hf", "protos", "router", "sim", "deploy/serve"]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_no_service_module_imports_the_testing_package() -> None:
    files = [p for d in SERVICE for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50  # the folders were found
    bad = {str(p.relative_to(ROOT)): [m for m in _imports(p) if m.split(".")[:2] == ["moefleet", "testing"]]
           for p in files}
    assert {p: ms for p, ms in bad.items() if ms} == {}


def test_the_check_sees_an_import_of_the_testing_package(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom moefleet.testing import Reference\n")
    assert _imports(f) == {"os", "moefleet.testing", "moefleet.testing.Reference"}
    f.write_text("from moefleet import testing\n")
    assert "moefleet.testing" in _imports(f)
