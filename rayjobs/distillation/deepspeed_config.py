"""The DeepSpeed config dict, built from ``DistillationConfig`` alone.

Pure (no DeepSpeed import) so every combination is unit-tested in milliseconds. The optimizer and
LR schedule are *not* in this dict: the train loop builds them itself (AdamW over layer-wise param
groups, ``rayjobs.distillation.schedule``) and hands them to ``deepspeed.initialize``, so one schedule
implementation serves DeepSpeed and the plain-PyTorch benchmark alike.
"""

from __future__ import annotations

import copy
from typing import Any

from rayjobs.distillation.config import DistillationConfig

# DeepSpeed prints a progress line every ``steps_per_print`` steps; our own curves replace it.
_QUIET_STEPS = 1 << 30


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` wins key by key; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _zero_section(cfg: DistillationConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    # Pinned host buffers only help host<->GPU copies; on CPU workers they are wasted memory.
    pin = cfg.scaling.use_gpu
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=cfg.scaling.use_gpu, contiguous_gradients=True, reduce_scatter=True)
    if ds.zero_stage == 3:
        # Lets save_16bit_model / the consolidated state dict gather full weights for the merge.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return zero


def _precision_sections(precision: str) -> dict[str, Any]:
    if precision == "bf16":
        return {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
    if precision == "fp16":
        # loss_scale 0 = dynamic loss scaling, the only sane default for fp16.
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                         "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
                "bf16": {"enabled": False}}
    return {"fp16": {"enabled": False}, "bf16": {"enabled": False}}


def build_deepspeed_config(cfg: DistillationConfig, world_size: int) -> dict[str, Any]:
    """The dict for ``deepspeed.initialize(config=...)``; ``deepspeed.extra`` is merged last.

    Batch sizes follow DeepSpeed's identity ``train_batch_size = micro * grad_accum * world``.
    A user ``extra`` that breaks the identity is passed through as written: DeepSpeed itself
    reports the mismatch, naming the three values.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    optim = cfg.optim
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": optim.micro_batch_size * optim.grad_accum * world_size,
        # 0.0 disables clipping in DeepSpeed.
        "gradient_clipping": float(optim.grad_clip) if optim.grad_clip is not None else 0.0,
        "zero_optimization": _zero_section(cfg),
        **_precision_sections(cfg.deepspeed.precision),
        # Our AdamW is a torch optimizer DeepSpeed did not build; ZeRO supports it, this says so.
        "zero_allow_untested_optimizer": True,
        # With CPU offload DeepSpeed otherwise insists on its own (JIT-compiled) CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, cfg.deepspeed.extra)
