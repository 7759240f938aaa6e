"""The `unit` marker's promise: no unit test module imports Ray, directly or through the code
it tests. Checked in a fresh interpreter, since this one may have imported Ray for other tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_no_unit_test_module_imports_ray() -> None:
    modules = sorted(f"tests.unit.{p.stem}" for p in (ROOT / "tests" / "unit").glob("test_*.py"))
    probe = ("import importlib, sys\n"
             f"for m in {modules!r}:\n"
             "    importlib.import_module(m)\n"
             "    if 'ray' in sys.modules:\n"
             "        sys.exit(f'{m} imports ray')\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:] or done.stdout
