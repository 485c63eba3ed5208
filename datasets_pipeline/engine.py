"""Map our generation config onto vLLM engine kwargs, sampling params and the engine actor pool.

Pure (no Ray, no vLLM): CPU vs GPU differs only in the placement bundles, the accelerator type
and how the KV cache is sized (bytes on CPU, see ``cluster.kv_cache``), all computed here; the
engine stage (``teacher.TeacherStage``), the other stages and the driver are the same code on both.
"""

from __future__ import annotations

from cluster.kv_cache import KVCacheSize, resolve_kv_cache
from datasets_pipeline.config import GenerationConfig


def kv_cache_size(cfg: GenerationConfig, model_path: str) -> KVCacheSize | None:
    """The KV cache in bytes (always on CPU, on GPU only when configured); None = vLLM's fraction.

    An engine runs at most ``batch_size`` sequences at once (it is ``max_num_seqs``).
    """
    e = cfg.engine
    if e.accelerator == "gpu" and e.kv_cache_gib is None:
        return None
    return resolve_kv_cache(e.kv_cache_gib, model_path, e.max_model_len, e.batch_size)


def processor_kwargs(cfg: GenerationConfig, model_path: str, kv_cache_bytes: int | None = None) -> dict:
    """The engine as ``ray.data.llm``'s processor config: the one mapping of the engine settings
    (``engine_stage_kwargs`` derives our own stage's from it, so both read the config alike).

    ``kv_cache_bytes`` (from ``kv_cache_size``) replaces vLLM's memory fraction when given.
    """
    e = cfg.engine
    memory = ({"kv_cache_memory_bytes": kv_cache_bytes} if kv_cache_bytes is not None
              else {"gpu_memory_utilization": e.memory_utilization})
    engine_kwargs = {
        # Weights from safetensors only: a pickled .bin runs code while it loads.
        "load_format": "safetensors",
        "enforce_eager": e.enforce_eager,
        **memory,
        "tensor_parallel_size": e.tensor_parallel_size,
        "max_num_seqs": e.batch_size,
    }
    if e.max_model_len:
        engine_kwargs["max_model_len"] = e.max_model_len
    engine_kwargs["seed"] = cfg.sampling.seed
    if cfg.sampling.logprobs_topk:
        engine_kwargs["max_logprobs"] = max(20, cfg.sampling.logprobs_topk)
    if e.accelerator == "cpu":
        # Without explicit CPU bundles the engine stage asks for a GPU and waits forever.
        placement = {"bundles": [{"CPU": 1} | e.bundle_resources] * e.tensor_parallel_size, "strategy": "PACK"}
    else:
        placement = {"bundles": [{"GPU": 1, "CPU": 1} | e.bundle_resources] * e.tensor_parallel_size,
                     "strategy": "STRICT_PACK"}
    return {
        "model_source": model_path,
        "batch_size": e.batch_size,
        # Always a pair: ray.data.llm reads an int n as a pool that autoscales from 1 to n, so
        # min_replicas engines would not all start (seen on the multi-node cluster: one engine of two).
        "concurrency": (e.min_replicas, e.max_replicas),
        "accelerator_type": e.accelerator_type,
        "engine_kwargs": engine_kwargs,
        "placement_group_config": placement,
        # We render chat prompts ourselves and read generated text: vLLM tokenizes and
        # detokenizes in-engine, so the extra CPU actors would only compete for cores.
        "chat_template_stage": False,
        "tokenize_stage": False,
        "detokenize_stage": False,
        # A bad row must not kill the run: failed rows come back with __inference_error__.
        "should_continue_on_error": True,
    }


def sampling_params(cfg: GenerationConfig) -> dict:
    """vLLM SamplingParams for one sample.

    The seed is set once per engine (engine_kwargs), not per request: vLLM's CPU
    sampler crashes the engine on per-request seeds ("CPU Generator does not use
    offset"), and the same code must run on CPU and GPU.
    """
    s = cfg.sampling
    params = {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": s.max_new_tokens,
        "detokenize": True,
    }
    if s.logprobs_topk:
        params["logprobs"] = s.logprobs_topk
    return params


def scoring_params(cfg: GenerationConfig) -> dict:
    """vLLM SamplingParams that score a supplied response instead of sampling one.

    The request's tokens are prompt + response; ``prompt_logprobs`` asks for the teacher's top-k at
    every one of them (a prefill, no decoding), and one new token is the least vLLM generates.
    Greedy and undetokenized: that token is thrown away. Logprobs are vLLM's raw ones, as in
    generation, so a scored and a generated sample of the same text store the same top-k.
    """
    return {"temperature": 0.0, "max_tokens": 1, "detokenize": False, "prompt_logprobs": cfg.sampling.logprobs_topk}


def engine_request_params(request_params: dict) -> dict:
    """A request's ``sampling_params`` as our engine stage hands them to vLLM: flat logprobs, and no
    detokenization (the stage decodes each completion once).

    With ``detokenize`` on, vLLM decodes every top-k token of every position to a string we never
    store, and builds one ``Logprob`` object per entry.
    """
    return {**request_params, "detokenize": False, "flat_logprobs": True}


def engine_stage_kwargs(cfg: GenerationConfig, model_path: str, kv_cache_bytes: int | None = None) -> dict:
    """How our engine stage runs: vLLM's kwargs and the actor pool's, from ``processor_kwargs``.

    The same bundles (``bundle_resources`` included), replicas and accelerator type as ray.data.llm's
    processor, so the config means the same: one engine per actor. With tensor parallelism vLLM's Ray
    executor places its workers in a placement group of the bundles (``placement_group`` set), else
    the actor itself reserves the one bundle's resources.
    """
    kw = processor_kwargs(cfg, model_path, kv_cache_bytes)
    tp = cfg.engine.tensor_parallel_size
    engine_kwargs = {**kw["engine_kwargs"], "distributed_executor_backend": "ray" if tp > 1 else "uni"}
    bundles, accelerator = kw["placement_group_config"]["bundles"], kw["accelerator_type"]
    if tp > 1:
        if accelerator:
            bundles = [{**b, f"accelerator_type:{accelerator}": 0.001} for b in bundles]
        return {"engine_kwargs": engine_kwargs, "replicas": kw["concurrency"], "actor": {"num_cpus": 0, "num_gpus": 0},
                "placement_group": {**kw["placement_group_config"], "bundles": bundles}}
    [bundle] = bundles
    actor = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
    custom = {name: amount for name, amount in bundle.items() if name not in ("CPU", "GPU")}
    actor |= ({"resources": custom} if custom else {}) | ({"accelerator_type": accelerator} if accelerator else {})
    return {"engine_kwargs": engine_kwargs, "replicas": kw["concurrency"], "actor": actor, "placement_group": None}
