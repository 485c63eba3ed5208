"""ServingConfig -> LLMConfig kwargs and the serving config itself: pure, no Ray started."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import ServingConfig
from service.llm_config import (
    SERVE_ADMISSION_FACTOR,
    adapter_model_id,
    deployment_config,
    engine_kwargs,
    llm_config_kwargs,
    placement_group_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**kw) -> ServingConfig:
    return ServingConfig.model_validate({"model": "/models/student", **kw})


def test_autoscaling_and_queue_are_explicit():
    cfg = _cfg(autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                            "max_ongoing_requests": 8, "max_queued_requests": 5, "upscale_delay_s": 1,
                            "downscale_delay_s": 4, "look_back_period_s": 2})
    d = deployment_config(cfg)
    assert d["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                                       "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2}
    # #17 item 4: Serve's own full-queue 503 is plain text, so Serve never refuses (unbounded queue) and
    # admits more than the guard's bound (8 running + 5 waiting): the guard refuses first, in JSON.
    assert cfg.autoscaling.max_in_flight == 13
    assert d["max_queued_requests"] == -1 and d["max_ongoing_requests"] == SERVE_ADMISSION_FACTOR * 13 > 13
    unbounded = _cfg(autoscaling={"max_ongoing_requests": 8, "max_queued_requests": -1})
    assert unbounded.autoscaling.max_in_flight is None and deployment_config(unbounded)["max_ongoing_requests"] == 8
    # The ray.serve.llm defaults are 1e9: never scale, never queue. Ours are always set.
    assert _cfg().autoscaling.target_ongoing_requests < 1e6
    assert deployment_config(_cfg())["max_ongoing_requests"] < 1e6


def test_cpu_placement_and_engine():
    cfg = _cfg(max_model_len=256)
    eng = engine_kwargs(cfg, kv_cache_bytes=64 << 20)
    assert eng == {"kv_cache_memory_bytes": 64 << 20, "load_format": "safetensors", "max_model_len": 256,
                   "enforce_eager": True}
    assert placement_group_config(cfg, eng) == {"bundles": [{"CPU": 1}], "strategy": "PACK"}
    assert "accelerator_type" not in llm_config_kwargs(cfg, "/models/student")


def test_gpu_placement_one_bundle_per_engine_worker():
    cfg = _cfg(accelerator="gpu", accelerator_type="L4", engine_kwargs={"tensor_parallel_size": 2})
    eng = engine_kwargs(cfg)
    assert "enforce_eager" not in eng
    assert placement_group_config(cfg, eng)["bundles"] == [{"GPU": 1, "CPU": 1}, {"GPU": 1, "CPU": 1}]
    assert llm_config_kwargs(cfg, "/models/student")["accelerator_type"] == "L4"


def test_adapters_turn_on_lora_and_user_engine_kwargs_win():
    cfg = _cfg(adapters={"math": "/a/math", "chat": "s3://b/chat"},
               engine_kwargs={"max_lora_rank": 64, "enforce_eager": False})
    eng = engine_kwargs(cfg)
    assert eng["enable_lora"] is True and eng["max_loras"] == 2
    assert eng["max_lora_rank"] == 64 and eng["enforce_eager"] is False
    assert adapter_model_id(cfg.model_id, "math") == "raystill-student:math"


@pytest.mark.parametrize("key", ["model", "served_model_name"])
def test_engine_kwargs_cannot_rename_the_model(key):
    with pytest.raises(ValueError, match="serving.model"):
        engine_kwargs(_cfg(engine_kwargs={key: "x"}))


def test_model_source_is_the_resolved_version():
    """The app resolves the served location (its release, then a local path or s3://) before this."""
    local = llm_config_kwargs(_cfg(model="demo:student"), "/cache/demo/student")
    assert local["model_loading_config"] == {"model_id": "raystill-student", "model_source": "/cache/demo/student"}
    s3 = llm_config_kwargs(_cfg(model="s3://bucket/run/merged"), "s3://bucket/run/versions/v1")
    assert s3["model_loading_config"]["model_source"] == "s3://bucket/run/versions/v1"


@pytest.mark.parametrize("bad, needle", [
    ({"adapters": {"a:b": "/x"}}, "adapter names"),
    ({"accelerator_type": "L4"}, "accelerator: gpu"),
    ({"model_id": "a:b"}, "model_id"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas"),
    ({"request_log": {"enabled": True}}, "path is required"),
    ({"limits": {"max_tokens": 0}}, "max_tokens"),
    ({"surprise": 1}, "surprise"),
])
def test_invalid_serving_configs_are_rejected(bad, needle):
    with pytest.raises(ValidationError, match=needle):
        _cfg(**bad)


def test_kuberay_args_are_what_build_app_accepts():
    """serveConfigV2 passes ``serving.model_dump(mode="json")``; it must validate back unchanged."""
    from rayjobs.kuberay import APP_IMPORT_PATH, serve_config
    from rayjobs.config import load_config
    from rayjobs.serve import APP_NAME

    cfg = load_config(ROOT / "examples" / "configs" / "demo.yaml")
    app = serve_config(cfg)["applications"][0]
    assert app["import_path"] == "service.app:build_app" == APP_IMPORT_PATH
    assert app["name"] == APP_NAME
    assert ServingConfig.model_validate(app["args"]) == cfg.serving


def test_kwargs_validate_as_a_real_llm_config():
    """The real ray.serve.llm LLMConfig accepts them (imports vLLM: a few seconds, no engine)."""
    from ray.serve.llm import LLMConfig

    cfg = _cfg(adapters={"a": "/a"}, autoscaling={"max_replicas": 3})
    llm = LLMConfig(**llm_config_kwargs(cfg, "/models/student"))
    engine = llm.get_engine_config()
    assert engine.placement_bundles == [{"CPU": 1}]
    assert type(engine.accelerator).__name__ == "CPUAccelerator"
    assert engine.engine_kwargs["enable_lora"] is True
    assert llm.deployment_config["autoscaling_config"]["max_replicas"] == 3


def _model_dir(tmp_path, **shape) -> str:
    import json

    hf = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128,
          "max_position_embeddings": 512, "dtype": "float32", **shape}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return str(tmp_path)


def test_kv_cache_in_bytes_on_cpu_fraction_on_gpu(tmp_path):
    """CPU: always bytes, derived from the model and max_ongoing_requests, never from the host."""
    from service.llm_config import kv_cache_size

    model = _model_dir(tmp_path)
    kv = kv_cache_size(_cfg(max_model_len=256, autoscaling={"max_ongoing_requests": 4}), model)
    per_token = 2 * 2 * 2 * 32 * 4
    assert kv.derived and kv.bytes >= 4 * 256 * per_token
    assert kv_cache_size(_cfg(kv_cache_gib=0.5), model).bytes == 1 << 29
    assert kv_cache_size(_cfg(accelerator="gpu"), model) is None
    assert kv_cache_size(_cfg(accelerator="gpu", kv_cache_gib=2), model).bytes == 2 << 30
    # engine_kwargs' max_num_seqs bounds the sequences one engine holds at once.
    more = kv_cache_size(_cfg(max_model_len=256, engine_kwargs={"max_num_seqs": 64}), model)
    assert more.bytes > kv.bytes


def test_remote_code_only_with_the_top_level_switch():
    """#17 item 8: engine_kwargs could turn on trust_remote_code unnoticed."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="trust_remote_code: true at the top"):
        _cfg(engine_kwargs={"trust_remote_code": True})
    allowed = _cfg(trust_remote_code=True, engine_kwargs={"trust_remote_code": True})
    assert engine_kwargs(allowed)["trust_remote_code"] is True
    assert "trust_remote_code" not in engine_kwargs(_cfg())
