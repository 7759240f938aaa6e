"""One `moefleet serve` process for the e2e session, started the way a user starts it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moefleet.testing import Reference
from tests.specs import family_spec

# Tight limits so the error paths are cheap to reach.
LIMITS = {"max_request_tokens": 4096, "max_message_mb": 4, "max_queue_tokens": 4096,
          "max_wait_ms": 2.0}
TOKEN = "e2e-admin-token"  # the admin token `serve` is started with (through $MOEFLEET_TOKEN)


class Served:
    def __init__(self, spec, address: str, proc: subprocess.Popen):
        self.spec, self.address, self.proc = spec, address, proc
        self.token = TOKEN
        self.reference = Reference(spec)


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    spec = family_spec("deepseek_v3", router=LIMITS, hosts={"slots": 24})
    path = tmp_path_factory.mktemp("spec") / "e2e.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    cli = Path(sys.executable).with_name("moefleet")
    log = open(path.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(cli), "serve", str(path), "--host", "127.0.0.1", "--port", "0", "--num-cpus", "2"],
        stdout=subprocess.PIPE, stderr=log, text=True,
        env={**os.environ, "RAY_ADDRESS": "", "MOEFLEET_TOKEN": TOKEN},
    )
    address = read_address(proc, path.with_suffix(".log"))
    yield Served(spec, address, proc)
    try:
        stop(proc)
    finally:
        log.close()


def stop(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM a `serve` process the test started (by its PID); kill it if it lingers."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()


def read_address(proc: subprocess.Popen, log_path: Path, timeout_s: float = 180) -> str:
    """The address `serve` prints alone on stdout, waiting at most timeout_s for it."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline().strip() if ready else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"moefleet serve did not start:\n{log_path.read_text()[-4000:]}")
    return line
