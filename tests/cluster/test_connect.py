import pytest

from cluster.sizing import MIN_LOGICAL_CPUS


@pytest.mark.slow
def test_local_ray_is_sized_for_all_engines(ray_local):
    from cluster.connect import ray_init

    assert ray_local.cluster_resources()["CPU"] >= MIN_LOGICAL_CPUS
    assert ray_init() is not None  # second call reuses the running Ray
