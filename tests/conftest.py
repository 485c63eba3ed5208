"""Shared fixtures. Real engines start once per session: Ray is expensive on 2 cores."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for every test that needs one, sized by cluster.sizing like the jobs."""
    import ray

    from cluster.config import ClusterConfig
    from cluster.connect import ray_init

    os.environ.pop("RAY_ADDRESS", None)
    ray_init(ClusterConfig())
    yield ray
    ray.shutdown()
