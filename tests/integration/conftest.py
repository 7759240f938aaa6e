from __future__ import annotations

import pytest
import ray

from moefleet.cluster.service import NAMESPACE


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole integration session."""
    ray.init(num_cpus=4, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
