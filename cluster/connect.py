"""The one place every job gets its Ray: an existing cluster or an embedded local one."""

from __future__ import annotations

import logging
import os

from cluster.config import ClusterConfig
from cluster.errors import ConfigError
from cluster.sizing import local_ray_size
from cluster.storage import is_s3

log = logging.getLogger(__name__)


def is_embedded(cfg: ClusterConfig | None = None) -> bool:
    """True when jobs run on a Ray this process starts on this machine (no address given).

    Then every engine runs on this node, so what this node has free can be checked up front.
    """
    cfg = cfg or ClusterConfig()
    return not (cfg.address or os.environ.get("RAY_ADDRESS"))


def ray_init(cfg: ClusterConfig | None = None):
    """Connect to ``cfg.address`` / ``RAY_ADDRESS``, else start a local Ray sized for the demo.

    Idempotent: a second call in the same process returns the running context.
    """
    import psutil
    import ray

    cfg = cfg or ClusterConfig()
    if ray.is_initialized():
        return ray.get_runtime_context()
    runtime_env = {"env_vars": dict(cfg.env_vars)} if cfg.env_vars else None
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        size = local_ray_size(
            physical_cores=os.cpu_count() or 1,
            total_memory_bytes=psutil.virtual_memory().total,
            num_cpus=cfg.local.num_cpus,
            object_store_memory_mb=cfg.local.object_store_memory_mb,
        )
        log.info(
            "starting local Ray: %d logical CPUs, %d MiB object store",
            size.num_cpus,
            size.object_store_memory >> 20,
        )
        ray.init(
            num_cpus=size.num_cpus,
            object_store_memory=size.object_store_memory,
            include_dashboard=cfg.local.include_dashboard,
            runtime_env=runtime_env,
        )
    return ray.get_runtime_context()


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are up now (a KubeRay head counts as one)."""
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def require_shared(locations: dict[str, str]) -> None:
    """On a Ray cluster of several nodes, refuse local paths that workers on other nodes use.

    Each node has its own disk: a local checkpoint directory would hold each rank's shard on a
    different node (no node could resume from it), and a local data path exists on one node only.
    ``locations`` maps the setting's name to its value, so the message names what to change.
    """
    local = {name: value for name, value in locations.items() if not is_s3(value)}
    if not local:
        return
    nodes = alive_nodes()
    if nodes > 1:
        paths = ", ".join(f"{name}={value!r}" for name, value in local.items())
        raise ConfigError(f"{paths}: a local path on a Ray cluster of {nodes} nodes would be split across "
                          "their disks; use shared storage (s3://bucket/prefix)")
