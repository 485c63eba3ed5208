from datasets_pipeline.config import GenerationConfig
from datasets_pipeline.engine import processor_kwargs, sampling_params


def cfg(**engine):
    return GenerationConfig(teacher="t", input={"path": "in.jsonl"}, output="out",
                            sampling={"logprobs_topk": 8, "n": 2, "temperature": 0.7}, engine=engine)


def test_cpu_profile_uses_cpu_bundles_and_no_extra_stages():
    kw = processor_kwargs(cfg(), "/m")
    assert kw["placement_group_config"]["bundles"] == [{"CPU": 1}]
    assert not (kw["chat_template_stage"] or kw["tokenize_stage"] or kw["detokenize_stage"])
    assert kw["should_continue_on_error"] and kw["concurrency"] == (1, 1)
    assert kw["engine_kwargs"]["max_logprobs"] >= 8


def test_gpu_profile_is_configuration_only():
    kw = processor_kwargs(cfg(accelerator="gpu", tensor_parallel_size=2, min_replicas=1, max_replicas=4,
                              accelerator_type="A10G"), "/m")
    assert kw["placement_group_config"]["bundles"] == [{"GPU": 1, "CPU": 1}] * 2
    assert kw["concurrency"] == (1, 4) and kw["accelerator_type"] == "A10G"
    assert kw["engine_kwargs"]["tensor_parallel_size"] == 2


def test_min_replicas_all_start_and_bundle_resources_reach_every_bundle():
    kw = processor_kwargs(cfg(min_replicas=2, max_replicas=2, bundle_resources={"vllm": 1}), "/m")
    assert kw["concurrency"] == (2, 2)  # an int 2 would be a pool autoscaling from 1
    assert kw["placement_group_config"]["bundles"] == [{"CPU": 1, "vllm": 1}]


def test_vllm_accepts_our_processor_config():
    from ray.data.llm import vLLMEngineProcessorConfig

    vLLMEngineProcessorConfig(**processor_kwargs(cfg(), "/m"))


def test_sampling_params_seed_is_per_engine():
    c = cfg()
    a = sampling_params(c)
    assert "seed" not in a  # vLLM CPU crashes on per-request seeds
    assert processor_kwargs(c, "/m")["engine_kwargs"]["seed"] == c.sampling.seed
    assert a["logprobs"] == 8 and a["temperature"] == 0.7


def test_kv_cache_bytes_replace_the_memory_fraction(tmp_path):
    import json

    from datasets_pipeline.engine import kv_cache_size

    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "max_position_embeddings": 4096}))
    kv = kv_cache_size(cfg(max_model_len=256, batch_size=8), str(tmp_path))
    assert kv.bytes >= 8 * 256 * (2 * 2 * 4 * 16 * 4)
    eng = processor_kwargs(cfg(), "/m", kv.bytes)["engine_kwargs"]
    assert eng["kv_cache_memory_bytes"] == kv.bytes and "gpu_memory_utilization" not in eng
    assert kv_cache_size(cfg(accelerator="gpu"), str(tmp_path)) is None
    assert processor_kwargs(cfg(accelerator="gpu"), "/m")["engine_kwargs"]["gpu_memory_utilization"] == 0.9
