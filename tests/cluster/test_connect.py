import pytest

from cluster.sizing import MIN_LOGICAL_CPUS


@pytest.mark.slow
def test_local_ray_is_sized_for_all_engines(ray_local):
    from cluster.connect import ray_init

    assert ray_local.cluster_resources()["CPU"] >= MIN_LOGICAL_CPUS
    assert ray_init() is not None  # second call reuses the running Ray


@pytest.mark.slow
def test_a_local_output_is_fine_on_one_node(ray_local):
    """Refused only with several nodes (tests/cluster/test_multinode.py); an embedded Ray is one node."""
    from cluster.connect import alive_nodes, require_shared

    assert alive_nodes() == 1
    require_shared({"distillation.output": "/tmp/out", "distillation.data": "s3://bucket/generated"})
