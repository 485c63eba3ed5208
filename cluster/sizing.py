"""How many logical CPUs and how much object store a local Ray gets.

Ray schedules by *logical* resources. On a 2-core laptop the real engines each
ask for whole CPUs (a vLLM engine bundle, Ray Data map actors, two Train workers,
Serve proxy + ingress + replicas), so advertising only the physical cores
deadlocks the pipeline (PLATFORM.md: the Serve ingress could not be placed with
num_cpus=2). Oversubscribing is safe because these processes mostly wait on each
other. One function decides this so every job sizes Ray the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_LOGICAL_CPUS = 8
LOGICAL_PER_CORE = 4
OBJECT_STORE_FRACTION = 0.15
OBJECT_STORE_CAP_MB = 2048


@dataclass(frozen=True)
class LocalRaySize:
    num_cpus: int
    object_store_memory: int  # bytes


def local_ray_size(
    physical_cores: int,
    total_memory_bytes: int,
    num_cpus: int | None = None,
    object_store_memory_mb: int | None = None,
) -> LocalRaySize:
    cpus = num_cpus or max(MIN_LOGICAL_CPUS, LOGICAL_PER_CORE * max(1, physical_cores))
    if object_store_memory_mb is None:
        store_mb = min(OBJECT_STORE_CAP_MB, int(total_memory_bytes * OBJECT_STORE_FRACTION) >> 20)
    else:
        store_mb = object_store_memory_mb
    return LocalRaySize(num_cpus=cpus, object_store_memory=max(128, store_mb) << 20)
