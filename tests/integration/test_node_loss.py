"""Node loss: a worker node holding expert hosts is removed from a `ray.cluster_utils.Cluster`
under load. Clients with a 10 s deadline (retrying UNAVAILABLE within it) lose no request and
get no wrong answer while the lost replicas are restored, and the lost hosts come back on the
remaining capacity.

The cluster needs a Ray of its own, so the driver runs in a child interpreter
(`_node_loss.py`), which reports what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_removed_worker_node_loses_no_answer_and_its_hosts_come_back():
    script = Path(__file__).with_name("_node_loss.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # it makes its own
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=400, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["wrong"] == 0 and r["answers"] > 0
    assert r["errors"] == 0, r
    assert r["lost_hosts"], "the removed node held expert hosts"
    assert r["restored_s"] is not None, f"every expert served from a live node again: {r}"
    assert r["removed_node"] not in r["hosts_after"].values()
