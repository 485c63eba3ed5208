"""An endpoint config (``EngineServiceConfig``) -> the keyword arguments of ``ray.serve.llm.LLMConfig``. Pure: no Ray, no vLLM.

Everything the engine replica needs is decided here, so it can be checked without starting
anything: the model source, the vLLM engine arguments, the placement bundles (CPU vs GPU),
and the Serve deployment options (autoscaling, Serve's admission above the guard's queue bound).

LoRA adapters are not passed as ``LLMConfig.lora_config``: that path (Serve multiplexing)
takes only a remote ``dynamic_lora_loading_path`` (s3://, gs://, azure://) holding one
subfolder per adapter, and picks the adapter from the ``serve_multiplexed_model_id``
header. Our adapters are named individually (local or s3://), so every replica loads all
of them at start-up (``service.app``) and vLLM serves each as ``<model_id>:<name>``, the
name ray.serve.llm gives LoRA models too. Here we only turn LoRA on in the engine.
"""

from __future__ import annotations

from typing import Any

from cluster.kv_cache import KVCacheSize, resolve_kv_cache
from service.config import EngineServiceConfig

# Engine arguments that ray.serve.llm sets itself (from model_loading_config) and rejects.
_RESERVED_ENGINE_KWARGS = ("model", "served_model_name")
# ray.serve.llm's multiplexed-LoRA id separator; our adapter ids follow the same scheme.
LORA_SEPARATOR = ":"
# Serve admits this many times what the guard holds per replica, so requests beyond the guard's
# bound reach the guard (and get its JSON 503) instead of waiting in Serve for a slot.
SERVE_ADMISSION_FACTOR = 2


def adapter_model_id(model_id: str, adapter: str) -> str:
    return f"{model_id}{LORA_SEPARATOR}{adapter}"


def max_num_seqs(cfg: EngineServiceConfig) -> int:
    """Sequences one replica's engine runs at once: Serve never hands it more than max_ongoing_requests."""
    return int(cfg.engine_kwargs.get("max_num_seqs", cfg.autoscaling.max_ongoing_requests))


def kv_cache_size(cfg: EngineServiceConfig, model_dir: str) -> KVCacheSize | None:
    """The KV cache in bytes (always on CPU, on GPU only when configured); None = vLLM's fraction."""
    if cfg.accelerator == "gpu" and cfg.kv_cache_gib is None:
        return None
    return resolve_kv_cache(cfg.kv_cache_gib, model_dir, cfg.max_model_len, max_num_seqs(cfg))


def engine_kwargs(cfg: EngineServiceConfig, kv_cache_bytes: int | None = None) -> dict[str, Any]:
    """vLLM engine arguments; ``kv_cache_bytes`` (from ``kv_cache_size``) replaces the memory fraction."""
    if kv_cache_bytes is not None:
        kwargs: dict[str, Any] = {"kv_cache_memory_bytes": kv_cache_bytes}
    else:
        kwargs = {"gpu_memory_utilization": cfg.memory_utilization}
    # Weights from safetensors only: a pickled .bin runs code while it loads.
    kwargs["load_format"] = "safetensors"
    if cfg.max_model_len is not None:
        kwargs["max_model_len"] = cfg.max_model_len
    if cfg.accelerator == "cpu":
        # CPU graph compilation costs minutes at start for no gain on small models.
        kwargs["enforce_eager"] = True
    if cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    kwargs.update(cfg.engine_defaults())
    kwargs.update(cfg.engine_kwargs)
    reserved = [k for k in _RESERVED_ENGINE_KWARGS if k in kwargs]
    if reserved:
        s = cfg.section
        raise ValueError(f"{s}.engine_kwargs must not set {reserved}: use {s}.model / {s}.model_id")
    return kwargs


def placement_group_config(cfg: EngineServiceConfig, engine: dict[str, Any]) -> dict[str, Any]:
    """One bundle per engine worker (tensor x pipeline parallel), CPU or GPU.

    The replica actor's own CPU is merged into the first bundle by ray.serve.llm.
    """
    workers = int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))
    bundle = ({"CPU": 1} if cfg.accelerator == "cpu" else {"GPU": 1, "CPU": 1}) | cfg.bundle_resources
    return {"bundles": [dict(bundle) for _ in range(workers)], "strategy": "PACK"}


def deployment_config(cfg: EngineServiceConfig) -> dict[str, Any]:
    """Serve options of the engine deployment, which is also the HTTP ingress.

    ``target_ongoing_requests`` is always explicit: the ray.serve.llm default (1e9) means
    "never autoscale". The bounded queue is the guard's, not Serve's: Serve's own 503 on a
    full queue is plain text ("Request dropped due to backpressure") written by the replica
    (HAProxy mode) or the proxy before our code runs, and Serve offers no hook to shape it.
    So Serve's queue is unbounded (-1) and its per-replica limit is twice the guard's bound
    (``AutoscalingConfig.max_in_flight``): the guard refuses the surplus itself, with an
    OpenAI-style JSON 503 and ``Retry-After``, and a refusal frees its Serve slot at once.
    Requests wait in vLLM's scheduler (``max_num_seqs`` = ``max_ongoing_requests``).
    """
    a = cfg.autoscaling
    bound = a.max_in_flight
    return {
        "autoscaling_config": {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s,
        },
        "max_ongoing_requests": a.max_ongoing_requests if bound is None else SERVE_ADMISSION_FACTOR * bound,
        "max_queued_requests": -1,
        # One line per request in the replica log is real CPU on small machines; the
        # engine's own stats and the proxy's metrics still count every request.
        "logging_config": {"enable_access_log": False},
    }


def llm_config_kwargs(cfg: EngineServiceConfig, resolved_model: str, kv_cache_bytes: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``ray.serve.llm.LLMConfig`` (``resolved_model``: a local path;
    s3:// models are passed through)."""
    engine = engine_kwargs(cfg, kv_cache_bytes)
    kwargs: dict[str, Any] = {
        "model_loading_config": {"model_id": cfg.model_id, "model_source": resolved_model},
        "engine_kwargs": engine,
        "placement_group_config": placement_group_config(cfg, engine),
        "deployment_config": deployment_config(cfg),
        # Per-step Prometheus export through Ray costs CPU on every decode step; vLLM's own
        # stats logging stays on.
        "log_engine_metrics": False,
    }
    if cfg.accelerator == "gpu" and cfg.accelerator_type:
        kwargs["accelerator_type"] = cfg.accelerator_type
    return kwargs
