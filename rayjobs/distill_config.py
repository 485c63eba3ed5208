"""Distillation stage config: Ray Train + DeepSpeed, losses, LoRA, checkpoints, the gate."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.storage import Location


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LossConfig(_Strict):
    kind: Literal["data", "logit", "feature"] = Field("data", description="Distillation signal.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"] = "forward_kl"
    temperature: float = Field(1.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the KD term; (1-alpha) weights cross-entropy.")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="Generalized JSD interpolation.")
    lam: float = Field(0.1, ge=0.0, le=1.0, description="Skew KL mixing.")
    tail: Literal["renormalize", "bucket"] = Field("bucket", description="Treatment of mass outside the teacher top-k.")


class LoraConfig(_Strict):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    layerwise_lr_decay: float | None = Field(None, gt=0.0, le=1.0)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    epochs: float = Field(1.0, gt=0.0)
    micro_batch_size: int = Field(16, ge=1, description="Sequences per worker per micro-step.")
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0.0)
    gradient_checkpointing: bool = False
    packing: bool = False


class DeepSpeedConfig(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    extra: dict[str, Any] = Field(default_factory=dict, description="Extra DeepSpeed config keys, merged last.")

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params requires zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer requires zero_stage >= 1")
        return self


class ScalingConfig(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads of each worker's torch. Default: what Ray sets for the worker "
        "(OMP_NUM_THREADS = its CPUs). Set it on CPU nodes where Ray's logical CPUs outnumber cores.",
    )


class GateConfig(_Strict):
    """A student that misses these is not merged into serving."""

    min_em: float | None = Field(None, ge=0.0, le=1.0)
    min_teacher_agreement: float | None = Field(None, ge=0.0, le=1.0)


class EvalConfig(_Strict):
    """Held-out evaluation of the merged student on the generated shards' 'val' split."""

    limit: int | None = Field(256, ge=1, description="Evaluate at most this many held-out prompts (first sample of each).")
    max_new_tokens: int | None = Field(None, ge=1, description="Greedy generation budget; default: generation.sampling.max_new_tokens.")
    batch_size: int = Field(64, ge=1, description="Prompts per batched greedy generate call.")
    checker: str | None = Field(None, description="Answer checker, 'exact' or 'numeric'; default: generation.preprocess.checker.")


class DistillationConfig(_Strict):
    student: str = Field(description="Student model: local dir, s3:// URI or 'demo:student'.")
    data: Location | None = Field(None, description="Generated shards; defaults to generation.output.")
    output: Location = Field(description="Checkpoints, merged model and eval report go here.")
    max_seq_len: int = Field(512, ge=16)
    loss: LossConfig = Field(default_factory=LossConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    max_failures: int = Field(1, ge=0, description="Worker failures tolerated (restart from last checkpoint).")
    seed: int = 0
    shuffle_buffer: int = Field(
        1024, ge=0, description="Rows in each worker's local shuffle buffer (seeded per epoch); 0 keeps stream order."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
