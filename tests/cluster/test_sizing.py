from cluster.sizing import MIN_LOGICAL_CPUS, local_ray_size

GIB = 1 << 30


def test_two_core_laptop_gets_enough_logical_cpus():
    size = local_ray_size(physical_cores=2, total_memory_bytes=24 * GIB)
    # vLLM engine bundle + Ray Data actor + 2 Train workers + Serve proxy/ingress/replica.
    assert size.num_cpus >= MIN_LOGICAL_CPUS
    assert size.object_store_memory <= 2048 << 20


def test_big_machine_scales_and_object_store_is_capped():
    size = local_ray_size(physical_cores=32, total_memory_bytes=512 * GIB)
    assert size.num_cpus == 128
    assert size.object_store_memory == 2048 << 20


def test_explicit_values_win():
    size = local_ray_size(2, 24 * GIB, num_cpus=3, object_store_memory_mb=256)
    assert (size.num_cpus, size.object_store_memory) == (3, 256 << 20)
