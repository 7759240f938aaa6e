"""Chaos under load: an expert host killed three times at one replica per expert, the Router
killed once and the Controller killed once (SIGKILL, each by its PID), with an expert scaled,
added and removed in between. Clients with a 10 s deadline check every answer against the
reference of the routing version it reports. Nothing may fail and nothing may be wrong, with
the router reaching its hosts over the gRPC data plane or through Ray.
"""

from __future__ import annotations

import pytest

from moefleet.cluster import service
from tests import chaos
from tests.specs import family_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("transport", ["grpc", "ray"])
def test_killed_hosts_router_and_controller_lose_no_request_and_no_answer_is_wrong(
        ray_session, tmp_path, transport):
    spec = family_spec("deepseek_v3", hosts={"count": 2, "slots": 40, "spare": 1, "max_count": 8},
                       router={"transport": transport})
    svc = service.start(spec, port=0, state_dir=str(tmp_path / "state"))
    try:
        report = chaos.run(svc, spec, threads=3, max_s=150)
    finally:
        svc.shutdown()
    faults = [(f.kind, f.recovered_s) for f in report.faults]
    assert [k for k, _ in faults] == ["host", "router", "host", "controller", "host"]
    assert all(s is not None for _, s in faults), f"every fault is recovered from: {faults}"
    assert report.result.errors == [], report.result.errors[:3]
    assert report.wrong == []
    assert len(report.result.answers) >= 200
    versions = {v for *_, v in report.result.answers}
    assert len(versions) >= 6, f"the load spans the changes' versions, saw {sorted(versions)}"
