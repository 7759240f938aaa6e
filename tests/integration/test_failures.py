"""One moefleet service per Ray cluster. (Host failures: tests/integration/test_elastic.py.)"""

from __future__ import annotations

import pytest

from moefleet.cluster import service
from tests.specs import family_spec

pytestmark = pytest.mark.integration


def test_second_service_on_the_same_cluster_is_refused(ray_session):
    spec = family_spec("olmoe")
    svc = service.start(spec, port=0)
    try:
        with pytest.raises(RuntimeError, match="already runs"):
            service.start(spec, port=0)
    finally:
        svc.shutdown()


def test_a_router_the_cluster_cannot_place_fails_clearly_and_leaves_nothing(ray_session):
    spec = family_spec("olmoe", router={"num_cpus": 64, "start_timeout_s": 2})
    with pytest.raises(RuntimeError, match=r"a router did not start within 2s: .*'CPU': 64"):
        service.start(spec, port=0)
    svc = service.start(family_spec("olmoe"), port=0)  # nothing was left behind
    svc.shutdown()
