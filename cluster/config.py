"""Cluster stage config: where jobs run and how a local Ray is sized."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Environment variable names that hold credentials, by convention.
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


class StrictModel(BaseModel):
    """Base of every config section: an unknown key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class LocalRayConfig(StrictModel):
    """Sizing of the embedded Ray started when no cluster address is given."""

    num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs Ray advertises. Default: enough for a vLLM engine, Ray Data "
        "stages, Train workers and Serve replicas at once (at least 8), however few cores exist.",
    )
    object_store_memory_mb: int | None = Field(
        None,
        ge=128,
        description="Object store cap in MiB. Default: 15% of RAM, at most 2048, so streaming "
        "stays bounded on a laptop.",
    )
    include_dashboard: bool = Field(False, description="Start the dashboard (port 8265) locally.")


class ClusterConfig(StrictModel):
    """Where Ray jobs run: an existing cluster or an embedded local Ray."""

    address: str | None = Field(
        None,
        description="Ray cluster address (e.g. 'ray://head:10001' or 'auto'). When unset, "
        "RAY_ADDRESS is used; when that is unset too, a local Ray is started.",
    )
    local: LocalRayConfig = Field(default_factory=LocalRayConfig)
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables for every Ray worker. Written into job metadata, reports and "
        "serveConfigV2, so names that look secret (*KEY*, *TOKEN*, *SECRET*, *PASSWORD*) are refused: use a "
        "Kubernetes Secret (envFrom) or the cluster's own environment.",
    )

    @field_validator("env_vars")
    @classmethod
    def _no_secrets(cls, env: dict[str, str]) -> dict[str, str]:
        secret = sorted(name for name in env if SECRET_NAME.search(name))
        if secret:
            raise ValueError(f"{secret} look like secrets; this config is copied into job metadata, reports and "
                             "the RayService's serveConfigV2: put them in a Kubernetes Secret or the cluster's "
                             "environment instead")
        return env
