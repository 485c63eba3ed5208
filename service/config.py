"""Serving configs: the student's autoscaled OpenAI-compatible endpoint and the teacher scoring service."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from cluster.kv_cache import EngineMemory
from cluster.config import StrictModel
from cluster.storage import Location

# Adapter names become the suffix of 'base:name' model ids and file names: keep them plain.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"



class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0 = scale to zero).")
    max_replicas: int = Field(2, ge=1, description="Upper bound on engine replicas.")
    target_ongoing_requests: float = Field(4, gt=0, description="Per replica; the LLM default never scales.")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests one replica runs at once; more wait.")
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description="Requests allowed to wait beyond that, per replica; more get a fast 503 with Retry-After "
        "(service.guard). -1 = unbounded (not recommended).",
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Load must stay high this long before a replica is added.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Load must stay low this long before removing a replica.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window over which ongoing requests are averaged.")

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self

    @property
    def max_in_flight(self) -> int | None:
        """Generation requests one replica holds at once (running + waiting); None = unbounded.

        The one place this sum is made: the guard refuses beyond it, and Serve's own limits are
        set above it (``service.llm_config.deployment_config``) so that the guard refuses first.
        """
        if self.max_queued_requests < 0:
            return None
        return self.max_ongoing_requests + self.max_queued_requests


class LimitsConfig(StrictModel):
    """Per-request limits; a request over one gets a 4xx with an OpenAI-style error body."""

    max_tokens: int = Field(512, ge=1, description="Largest max_tokens accepted; also the cap of a chat request without one.")
    max_prompt_chars: int = Field(16000, ge=1, description="Largest prompt (sum of message contents) in characters.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body in bytes (413 beyond).")


class RequestLogConfig(StrictModel):
    """Served prompts become next round's generation input. Off by default: prompts may hold personal data."""

    enabled: bool = Field(False, description="Append served chat prompts as {id, messages} JSONL rows.")
    path: Location | None = Field(None, description="Directory (local or s3://) that receives the JSONL files.")
    include_completions: bool = Field(False, description="Also store the served answer (field 'completion').")
    redact_pii: bool = Field(True, description="Replace e-mails, phone numbers, ID-card and card numbers and IPs "
                             "with tags before anything is written (cluster/pii.py).")
    batch_rows: int = Field(256, ge=1, description="Rows per write; on s3:// each batch is one object.")
    flush_interval_s: float = Field(30.0, gt=0, description="A partial batch is written after this long.")

    @model_validator(mode="after")
    def _path_when_enabled(self):
        if self.enabled and not self.path:
            raise ValueError("path is required when request logging is enabled")
        return self


class EngineServiceConfig(EngineMemory):
    """What every vLLM endpoint of ours shares: model, engine, placement, autoscaling, auth."""

    section: ClassVar[str] = "serving"  # its key in the pipeline config, for error messages

    model: str | None = Field(None, description="Model to serve; the pipeline config fills the default.")
    model_id: str = Field("raystill-student", pattern=r"^[^:\s]+$", description="Name clients pass as `model`.")
    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="Engine hardware; picks the placement bundles.")
    accelerator_type: str | None = Field(None, description="GPU type Ray schedules on (e.g. 'L4', 'A10G'); gpu only.")
    host: str = Field("127.0.0.1", description="HTTP bind address for local runs (pods always bind 0.0.0.0).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode",
        description="Where Serve runs HTTP proxies when this job starts Serve: every node (a load balancer in "
        "front of the pods) or the head only (one entry point; also several nodes on one host, which would "
        "otherwise all bind the same port).",
    )
    max_model_len: int | None = Field(None, ge=16, description="Context length; default: the model's.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine arguments (e.g. dtype, max_num_seqs, max_lora_rank); override derived ones.",
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    api_key_env: str | None = Field("RAYSTILL_API_KEY", description="Env var holding the API key; unset/empty = no auth.")
    api_key_file: str | None = Field(None, description="File holding the API key (e.g. a mounted Kubernetes Secret).")
    trust_remote_code: bool = Field(
        False, description="Set from the pipeline's top-level trust_remote_code: vLLM may run the model's own code.")
    allow_unauthenticated: bool = Field(
        False, description="Serve without an API key on a non-loopback host. Off: such a start is refused.")

    def engine_defaults(self) -> dict[str, Any]:
        """Engine arguments this kind of endpoint needs (before ``engine_kwargs`` override them)."""
        return {}

    @model_validator(mode="after")
    def _no_remote_code_through_engine_kwargs(self):
        if self.engine_kwargs.get("trust_remote_code") and not self.trust_remote_code:
            raise ValueError("engine_kwargs.trust_remote_code would run the model repository's own Python code; "
                             "set trust_remote_code: true at the top of the config to allow it")
        return self

    @model_validator(mode="after")
    def _accelerator_type_needs_gpu(self):
        if self.accelerator_type and self.accelerator != "gpu":
            raise ValueError("accelerator_type is only meaningful with accelerator: gpu")
        return self


class ServingConfig(EngineServiceConfig):
    """The student's OpenAI-compatible endpoint."""

    adapters: dict[str, Location] = Field(default_factory=dict, description="LoRA adapters served on the base as 'base:name'.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    request_log: RequestLogConfig = Field(default_factory=RequestLogConfig)

    def engine_defaults(self) -> dict[str, Any]:
        return {"enable_lora": True, "max_loras": len(self.adapters)} if self.adapters else {}

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        import re

        bad = [name for name in adapters if not re.match(_NAME, name)]
        if bad:
            raise ValueError(f"adapter names must match {_NAME} (letters, digits, '.', '_', '-'): {bad}")
        return adapters


class ScoreLimitsConfig(StrictModel):
    """Per-request limits of the teacher scoring service; a request over one gets a 400 naming it."""

    max_tokens: int = Field(32768, ge=1, description="Most token ids (prompts + continuations) in one request.")
    max_sequences: int = Field(256, ge=1, description="Most sequences in one request.")
    max_top_k: int = Field(64, ge=1, description="Largest top_k a request may ask for (also vLLM's max_logprobs).")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Largest request body in bytes (413 beyond).")


class TeacherServiceConfig(EngineServiceConfig):
    """The teacher scoring service (service/teacher.py): per-token log-probs and top-k of given ids."""

    section: ClassVar[str] = "teacher_service"

    model_id: str = Field("raystill-teacher", pattern=r"^[^:\s]+$", description="Name of the teacher application's model.")
    route_prefix: str = Field(
        "/teacher", pattern=r"^/[A-Za-z0-9/_-]*$",
        description="URL prefix of the application on the Serve proxy, so it can share a cluster with the student "
        "(which serves at '/'): score at http://HOST:PORT<route_prefix>/v1/score.")
    limits: ScoreLimitsConfig = Field(default_factory=ScoreLimitsConfig)

    def local_url(self) -> str:
        """The base URL on this machine (clients post to ``<base>/v1/token_scores``)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"

    def engine_defaults(self) -> dict[str, Any]:
        # Prefix caching skips the prefill of cached blocks, and with it their prompt log-probs.
        return {"enable_prefix_caching": False, "max_logprobs": self.limits.max_top_k}

    @model_validator(mode="after")
    def _prefix_caching_stays_off(self):
        if self.engine_kwargs.get("enable_prefix_caching"):
            raise ValueError("teacher_service.engine_kwargs.enable_prefix_caching: true would drop prompt log-probs "
                             "of cached prefixes (vLLM skips their prefill); leave it unset")
        return self
