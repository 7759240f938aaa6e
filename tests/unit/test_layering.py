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


# ---- the direction of dependencies ---------------------------------------------------------

# Each package's folder, and the packages it may import. Dependencies point one way:
# core ← protos, experts ← router ← cluster ← the operator's tools and the apps on top;
# the client needs only the wire contract, and the HF integration only the client.
PACKAGES = {
    "core": "core", "protos": "protos", "experts": "experts", "router": "router",
    "cluster": "cluster", "cli": "cli", "client": "client", "hf": "hf", "sim": "sim",
    "serve": "deploy/serve", "testing": "testing",
}
ALLOWED = {
    "core": set(),
    "protos": {"core"},
    "experts": {"core"},
    "router": {"core", "protos", "experts"},
    "cluster": {"core", "protos", "experts", "router"},
    "client": {"protos"},
    "hf": {"client", "protos"},
    "sim": {"core", "experts", "router", "cluster"},
    "cli": {"core", "protos", "experts", "router", "cluster", "client", "sim"},
    "serve": {"core", "protos", "experts", "router", "cluster", "client", "hf"},
    "testing": {"core", "protos", "experts", "router", "cluster"},
}


def _module_of(path: Path) -> str:
    """moefleet.<package>.<module> of a file under one of the package folders."""
    for pkg, folder in PACKAGES.items():
        base = ROOT / folder
        if path.is_relative_to(base):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(["moefleet", pkg, *parts])
    raise ValueError(path)


def _graph() -> dict[str, set[str]]:
    """Every moefleet module -> the moefleet modules it imports, at any depth of its code
    (an import inside a function is a dependency too); relative imports resolved."""
    files = {_module_of(p): p for folder in PACKAGES.values() for p in (ROOT / folder).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for n in names:
                # the longest known module the name is in (`from m import f` names m.f)
                while n and n not in files:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    out.add(n)
        graph[mod] = out
    return graph


def _package(module: str) -> str:
    return module.split(".")[1]


def test_every_import_points_down_the_layers() -> None:
    graph = _graph()
    assert len(graph) > 60 and {_package(m) for m in graph} == set(PACKAGES)
    against = sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                     if _package(d) != _package(m) and _package(d) not in ALLOWED[_package(m)])
    assert against == []


def test_no_module_imports_itself_through_others() -> None:
    graph = _graph()
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert cycles == []


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of `graph`, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                out.append(sorted(component))
    return out


def test_the_checks_see_a_wrong_way_import_and_a_cycle() -> None:
    graph = {"moefleet.router.a": {"moefleet.cluster.b"}, "moefleet.cluster.b": {"moefleet.router.a"},
             "moefleet.core.c": set()}
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert cycles == [["moefleet.cluster.b", "moefleet.router.a"]]
    assert "cluster" not in ALLOWED["router"]
