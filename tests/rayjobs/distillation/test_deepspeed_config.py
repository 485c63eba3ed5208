"""DeepSpeed config building: pure, milliseconds."""

import pytest

from rayjobs.distillation.deepspeed_config import build_deepspeed_config, deep_merge
from rayjobs.distillation.config import DistillationConfig


def _cfg(**overrides) -> DistillationConfig:
    base = {"student": "s", "output": "out"}
    return DistillationConfig.model_validate({**base, **overrides})


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_is_passed_through(stage):
    ds = build_deepspeed_config(_cfg(deepspeed={"zero_stage": stage}), world_size=1)
    assert ds["zero_optimization"]["stage"] == stage
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_batch_identity_and_accumulation():
    ds = build_deepspeed_config(_cfg(optim={"micro_batch_size": 4, "grad_accum": 3}), world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2


def test_clipping_on_and_off():
    assert build_deepspeed_config(_cfg(optim={"grad_clip": 0.5}), 1)["gradient_clipping"] == 0.5
    assert build_deepspeed_config(_cfg(optim={"grad_clip": None}), 1)["gradient_clipping"] == 0.0


@pytest.mark.parametrize("precision,bf16,fp16", [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)])
def test_precision(precision, bf16, fp16):
    ds = build_deepspeed_config(_cfg(deepspeed={"precision": precision}), 1)
    assert ds["bf16"]["enabled"] is bf16
    assert ds["fp16"]["enabled"] is fp16
    if fp16:
        assert ds["fp16"]["loss_scale"] == 0  # dynamic


def test_offload_optimizer_and_params():
    ds = build_deepspeed_config(_cfg(deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True}), 1)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}


def test_offload_pins_memory_only_on_gpu():
    cfg = _cfg(deepspeed={"zero_stage": 2, "offload_optimizer": True}, scaling={"use_gpu": True})
    assert build_deepspeed_config(cfg, 1)["zero_optimization"]["offload_optimizer"]["pin_memory"] is True


def test_offload_validation_lives_in_the_config():
    with pytest.raises(ValueError, match="offload_params requires zero_stage 3"):
        _cfg(deepspeed={"zero_stage": 2, "offload_params": True})
    with pytest.raises(ValueError, match="offload_optimizer requires"):
        _cfg(deepspeed={"zero_stage": 0, "offload_optimizer": True})


def test_extra_is_merged_last_and_deep():
    extra = {"zero_optimization": {"reduce_bucket_size": 123, "stage": 1}, "gradient_clipping": 7.0, "new_key": [1]}
    ds = build_deepspeed_config(_cfg(deepspeed={"zero_stage": 2, "extra": extra}), 1)
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123
    assert ds["zero_optimization"]["contiguous_gradients"] is True  # untouched sibling survives
    assert ds["gradient_clipping"] == 7.0
    assert ds["new_key"] == [1]


def test_deep_merge_does_not_mutate():
    base, over = {"a": {"b": 1}}, {"a": {"c": 2}}
    assert deep_merge(base, over) == {"a": {"b": 1, "c": 2}}
    assert base == {"a": {"b": 1}} and over == {"a": {"c": 2}}


def test_config_is_json_serializable():
    import json

    json.dumps(build_deepspeed_config(_cfg(deepspeed={"zero_stage": 3, "offload_optimizer": True}), 4))


def test_world_size_must_be_positive():
    with pytest.raises(ValueError):
        build_deepspeed_config(_cfg(), 0)
