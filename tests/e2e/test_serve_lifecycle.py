"""A foreground `moefleet serve` ends when the service is shut down through the admin API
(`moefleet shutdown`), with exit code 0, and takes its embedded Ray with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import read_address, stop
from tests.specs import family_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_CLI = str(Path(sys.executable).with_name("moefleet"))


def test_moefleet_shutdown_ends_a_foreground_serve(tmp_path):
    path = tmp_path / "olmoe.yaml"
    path.write_text(yaml.safe_dump(family_spec("olmoe").to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("MOEFLEET_TOKEN", "RAY_ADDRESS")}
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([_CLI, "serve", str(path), "--port", "0", "--num-cpus", "2"],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            address = read_address(proc, tmp_path / "serve.log")
            out = subprocess.run([_CLI, "shutdown", "--server", address], capture_output=True,
                                 text=True, timeout=120, env=env)
            assert out.returncode == 0, out.stderr
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                stop(proc)
    assert "stopped by an admin Shutdown call" in (tmp_path / "serve.log").read_text()
