from __future__ import annotations

import pytest
import ray

from moefleet.cluster.service import NAMESPACE


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole integration session."""
    # address="local": a new Ray of our own, even when another one runs on this machine
    ray.init(address="local", num_cpus=4, namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()
