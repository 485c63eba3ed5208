"""Serving stage config: the autoscaled OpenAI-compatible endpoint for the student."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.storage import Location


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4, gt=0, description="Per replica; the LLM default never scales.")
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1, description="-1 = unbounded (not recommended).")
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class LimitsConfig(_Strict):
    max_tokens: int = Field(512, ge=1)
    max_prompt_chars: int = Field(16000, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)


class RequestLogConfig(_Strict):
    """Served prompts become next round's generation input. Off by default: prompts may hold personal data."""

    enabled: bool = False
    path: Location | None = None
    include_completions: bool = False

    @model_validator(mode="after")
    def _path_when_enabled(self):
        if self.enabled and not self.path:
            raise ValueError("path is required when request logging is enabled")
        return self


class ServingConfig(_Strict):
    model: str | None = Field(None, description="Model to serve; defaults to the merged student.")
    model_id: str = Field("raystill-student", description="Name clients pass as `model`.")
    adapters: dict[str, Location] = Field(default_factory=dict, description="LoRA adapters served on the base as 'base:name'.")
    accelerator: Literal["cpu", "gpu"] = "cpu"
    accelerator_type: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_model_len: int | None = Field(None, ge=16)
    memory_utilization: float = Field(0.1, gt=0.0, le=0.95)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    api_key_env: str | None = Field("RAYSTILL_API_KEY", description="Env var holding the API key; unset/empty = no auth.")
    api_key_file: str | None = Field(None, description="File holding the API key (e.g. a mounted Kubernetes Secret).")
    request_log: RequestLogConfig = Field(default_factory=RequestLogConfig)
