"""Distillation stage config: Ray Train + DeepSpeed, losses, LoRA, checkpoints, the gate."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cluster.config import StrictModel
from cluster.storage import Location
from rayjobs.distillation.recipe_config import (
    ContrastiveConfig,
    DropoutConfig,
    FeatureNoise,
    ProgressiveLayers,
    TemperaturePhase,
    check_phases,
)


# Why stored-top-k logit KD cannot train on supplied, unscored samples, and which knobs fix it; said
# when the config is loaded (rayjobs.config) and again at train start from the shards' manifest (plan).
SUPPLIED_UNSCORED = (
    "distillation.loss.kind 'logit' needs the teacher's top-k logprobs, and supplied responses "
    "(generation.input.response_field) carry none unless the teacher scores them: set "
    "generation.score_supplied: true (with generation.sampling.logprobs_topk > 0), or use "
    "distillation.loss.kind 'data', or distillation.teacher.source 'online' or 'service'")


class FeatureConfig(StrictModel):
    """kind 'feature': hidden states and attention maps of the online teacher (rayjobs/distillation/feature_losses.py)."""

    layer_map: list[tuple[int, int]] | None = Field(
        None, description="[student, teacher] hidden-state indices (0 = embeddings, i = block i); "
        "default: uniform, student block i -> teacher block round(i * L_t / L_s).")
    hidden_loss: Literal["mse", "cosine"] = Field("cosine", description="Hidden-state distance after the projection.")
    hidden_weight: float = Field(1.0, ge=0.0, description="Weight of the hidden-state loss.")
    attention_weight: float = Field(
        0.0, ge=0.0, description="Weight of the head-averaged attention-map KL (stage 2); > 0 runs both models "
        "with eager attention.")
    progressive: ProgressiveLayers | None = Field(
        None, description="Layer pairs join the feature losses by step, lower layers first; null: all from the start.")
    noise: FeatureNoise | None = Field(None, description="Gaussian noise on the student's hidden states in the "
                                       "feature loss, training only; null: none.")

    @model_validator(mode="after")
    def _schedule_per_pair(self):
        starts = self.progressive.start_steps if self.progressive else None
        if starts is not None and self.layer_map is not None and len(starts) != len(self.layer_map):
            raise ValueError(f"feature.progressive.start_steps has {len(starts)} entries for "
                             f"{len(self.layer_map)} layer_map pairs")
        return self


class LossScheduleConfig(StrictModel):
    """Schedules from practice: two-stage feature training and a temperature ramp."""

    stage1_steps: int = Field(
        0, ge=0, description="kind 'feature': the first N optimizer steps train the hidden-state loss only; "
        "later steps add cross-entropy, KD and the attention loss. 0: one stage.")
    temperature_start: float | None = Field(None, gt=0.0, description="KD temperature at the first step (linear ramp).")
    temperature_end: float | None = Field(None, gt=0.0, description="KD temperature at the last step.")
    temperatures: list[TemperaturePhase] | None = Field(
        None, description="KD temperature in explicit phases, e.g. [{until_epoch: 1, temperature: 2.0}, "
        "{temperature: 1.0}]; instead of the linear ramp.")

    @model_validator(mode="after")
    def _both_ends(self):
        if (self.temperature_start is None) != (self.temperature_end is None):
            raise ValueError("temperature_start and temperature_end go together (set both, or neither)")
        if self.temperatures is not None:
            if self.temperature_start is not None:
                raise ValueError("schedule.temperatures replaces temperature_start/temperature_end: set one form")
            check_phases(self.temperatures)
        return self


class XtokConfig(StrictModel):
    """Logit KD when the teacher's tokenizer differs from the student's (rayjobs/distillation/xtok.py)."""

    method: Literal["vocab_map", "uld"] = Field(
        "vocab_map", description="'vocab_map': teacher top-k mapped onto student ids at aligned positions; "
        "'uld': Universal Logit Distillation's sorted-probability L1 (no vocabulary relation needed).")
    online_topk: int = Field(
        32, ge=1, description="Online teacher: top-k of its full distribution mapped onto student ids per position.")


class LossConfig(StrictModel):
    kind: Literal["data", "logit", "feature"] = Field("data", description="Distillation signal.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"] = Field(
        "forward_kl", description="KD divergence between teacher and student token distributions: forward KL "
        "(mode-covering), reverse KL (mode-seeking), generalized JSD (beta), skew KL / skew reverse KL (lam).")
    temperature: float = Field(1.0, gt=0.0, description="KD softmax temperature for both distributions (> 1 softens).")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the KD term; (1-alpha) weights cross-entropy.")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="Generalized JSD interpolation.")
    lam: float = Field(0.1, ge=0.0, le=1.0, description="Skew KL mixing.")
    tail: Literal["renormalize", "bucket"] = Field("bucket", description="Treatment of mass outside the teacher top-k.")
    feature: FeatureConfig = Field(default_factory=FeatureConfig)
    schedule: LossScheduleConfig = Field(default_factory=LossScheduleConfig)
    xtok: XtokConfig = Field(default_factory=XtokConfig)
    contrastive: ContrastiveConfig = Field(default_factory=ContrastiveConfig)
    chunk_tokens: int | None = Field(
        None, ge=1, description="Tokens whose full-vocabulary logits exist at once: the student's LM head, every "
        "loss reading its logits and the online teacher's logits run over the micro-batch's labelled tokens in "
        "chunks of this many (rayjobs/distillation/chunked_head.py), so memory stays flat in sequence length, "
        "about chunk_tokens x vocabulary x 20 bytes (x 6 for cross-entropy and stored top-k KD). null: sized to "
        "~300 MB: 2**24 logits per chunk (110 tokens at 151,936 ids), 2**26 (441) for cross-entropy and stored "
        "top-k KD; a whole micro-batch for small vocabularies. Larger chunks amortize per-chunk overhead.")

    @model_validator(mode="after")
    def _stages_need_features(self):
        if self.schedule.stage1_steps and self.kind != "feature":
            raise ValueError("schedule.stage1_steps needs kind 'feature' (stage 1 trains the hidden-state loss)")
        return self

    def settings_fields(self) -> dict:
        """The fields ``rayjobs.distillation.losses.LossSettings`` takes."""
        return self.model_dump(include={"divergence", "temperature", "alpha", "beta", "lam", "tail"})


class TeacherServiceRef(StrictModel):
    """Where ``source: service`` finds the teacher scoring service (service/teacher.py) and how it calls it."""

    url: str | None = Field(
        None, pattern=r"^https?://", description="Base URL (posts go to URL/v1/token_scores); default: the "
        "teacher_service section of the same config (the app `raystill teacher serve` deploys).")
    top_k: int = Field(20, ge=1, description="Teacher top-k per position asked of the service.")
    timeout_s: float = Field(120.0, gt=0, description="Per request.")
    retries: int = Field(8, ge=0, description="Retries of a request on connection errors and 500/502/503/504, with "
                         "exponential backoff from 0.5 s (a replica restarting costs retries, not the run).")
    api_key_env: str | None = Field(None, description="Env var with the service's API key, read in the workers; "
                                    "default: teacher_service.api_key_env.")
    api_key_file: str | None = Field(None, description="File with the key; default: teacher_service.api_key_file.")


class TeacherConfig(StrictModel):
    """The teacher: stored top-k, online inside every training worker, or the scoring service."""

    model: str | None = Field(None, description="Teacher model; defaults to generation.teacher.")
    source: Literal["stored", "online", "service"] = Field(
        "stored", description="kind 'logit': KD from the top-k stored by generation, from the online teacher's "
        "full logits, or from the teacher scoring service scoring the stored samples on the fly (no top-k stored, "
        "the teacher never in training memory). kind 'feature' always runs the teacher online.")
    service: TeacherServiceRef = Field(default_factory=TeacherServiceRef)
    shard: Literal["none", "zero3"] = Field(
        "none", description="'zero3': partition the teacher's weights across workers with DeepSpeed ZeRO-3 "
        "(no optimizer), for teachers too large for one device; 'none': a full copy per worker.")
    offload: bool = Field(False, description="With shard 'zero3': keep the teacher's partitions in CPU memory.")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Teacher weights' dtype.")

    @model_validator(mode="after")
    def _offload_needs_zero3(self):
        if self.offload and self.shard != "zero3":
            raise ValueError("offload requires shard 'zero3'")
        return self


class OnPolicyConfig(StrictModel):
    """GKD-style on-policy batches: the student samples, the teacher service scores its tokens
    (rayjobs/distillation/on_policy.py; the sampler is rayjobs/distillation/sampler.py)."""

    fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="GKD's lambda: share of micro-batches whose continuations are sampled from "
        "the current student (chosen per batch by a seeded hash of its prompts, so a resume replays the same "
        "choices); 0: off.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of the student's rollouts (0: greedy).")
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled continuation (also capped by max_seq_len).")
    sync_every: int = Field(
        1, ge=1, description="Optimizer steps between refreshes of the sampler's weights from the trainer "
        "(policy lag is at most this minus one).")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"] = Field(
        "reverse_kl", description="Divergence on on-policy batches (reverse KL: GKD's and Qwen3's choice); "
        "off-policy batches keep loss.divergence.")
    alpha: float = Field(1.0, ge=0.0, le=1.0, description="Weight of KD on on-policy batches; (1-alpha) weights "
                         "cross-entropy on the student's own samples (usually 0: nothing to imitate there).")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs the sampler actor reserves.")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs the sampler actor reserves (1 on GPU clusters).")
    kv_cache_gib: float | None = Field(None, gt=0.0, description="Sampler's vLLM KV cache; default: derived from the "
                                       "student's shape (cluster/kv_cache.py).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments, merged last.")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0


class LoraConfig(StrictModel):
    """Train low-rank adapters instead of the full student; they are merged into the saved model."""

    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of every weight.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters: names matched by suffix, or 'all-linear'.")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapters, matched by name suffix (peft), e.g. "
        "['norm', 'embed_tokens'] for every RMSNorm and the (tied) embeddings, which stay tied to the head. "
        "LoRA assumes a pretrained base: an untrained student's frozen random norms and embeddings cap "
        "what the adapters can learn (the demo's LoRA run needs both).",
    )

    @field_validator("target_modules")
    @classmethod
    def _head_not_adapted(cls, modules):
        if isinstance(modules, list) and "lm_head" in modules:
            raise ValueError("LoRA adapters on lm_head are not supported (the chunked head needs a plain linear "
                             "head); train it in full with modules_to_save: [lm_head]")
        return modules


class OptimConfig(StrictModel):
    """The optimizer and its schedule; one optimizer step = grad_accum micro-steps on every worker."""

    optimizer: Literal["adamw", "adafactor", "lamb"] = Field(
        "adamw", description="AdamW; Adafactor (factored second moments: less optimizer memory); LAMB (AdamW with a "
        "per-tensor trust ratio, for large batches). See rayjobs/distillation/optimizers.py.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (not applied to norms and biases).")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="Learning-rate decay after warm-up, until the last step (constant: none).")
    warmup_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="Share of the steps spent warming the LR up from 0; default 0.05 "
        "(when warmup_steps is unset).")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up in optimizer steps (not with warmup_ratio).")
    layerwise_lr_decay: float | None = Field(
        None, gt=0.0, le=1.0, description="Each block's LR is this times the block above's (top block and head at "
        "lr); unset: one LR for all.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over each worker's share of the train rows (unless max_steps).")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per worker per micro-step.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm to this; null: no clipping.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory).")
    packing: bool = Field(False, description="Pack several samples into each max_seq_len row (not with an online teacher).")

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("optim.warmup_steps and optim.warmup_ratio both set: warm-up is one or the other")
        if self.warmup_steps is not None and self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"optim.warmup_steps ({self.warmup_steps}) must be below optim.max_steps "
                             f"({self.max_steps})")
        return self

    def warmup(self, total_steps: int) -> int:
        """Warm-up steps of a run of ``total_steps``: ``warmup_steps``, else ``warmup_ratio`` (0.05) of the run."""
        from rayjobs.distillation.schedule import warmup_steps

        if self.warmup_steps is not None:
            return self.warmup_steps
        return warmup_steps(total_steps, 0.05 if self.warmup_ratio is None else self.warmup_ratio)


class DeepSpeedConfig(StrictModel):
    """DeepSpeed in every Train worker: ZeRO sharding, offload, precision."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO >= 1).")
    offload_params: bool = Field(False, description="Keep parameter partitions in CPU memory (ZeRO 3).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision; fp16 needs GPUs (loss scaling), bf16 runs on CPU and GPU.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Extra DeepSpeed config keys, merged last.")

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params requires zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer requires zero_stage >= 1")
        return self


class ScalingConfig(StrictModel):
    """Ray Train's worker group: how many workers and what each reserves."""

    num_workers: int = Field(1, ge=1, description="Train workers (data-parallel ranks), one DeepSpeed process each.")
    use_gpu: bool = Field(False, description="One GPU per worker (and evaluation on a GPU).")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="Logical CPUs each worker reserves in Ray.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places the workers' bundles (Ray Train's placement_strategy): STRICT_SPREAD puts "
        "each worker on its own node (one rank per GPU pod), PACK fills a node first.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads of each worker's torch. Default: what Ray sets for the worker "
        "(OMP_NUM_THREADS = its CPUs). Set it on CPU nodes where Ray's logical CPUs outnumber cores.",
    )


class GateConfig(StrictModel):
    """A student that misses these is not merged into serving."""

    min_em: float | None = Field(None, ge=0.0, le=1.0, description="Least held-out exact match; null: not checked.")
    min_teacher_agreement: float | None = Field(
        None, ge=0.0, le=1.0, description="Least share of held-out answers equal to the teacher's; null: not checked.")


class EvalConfig(StrictModel):
    """Held-out evaluation of the merged student on the generated shards' 'val' split."""

    limit: int | None = Field(256, ge=1, description="Evaluate at most this many held-out prompts (first sample of each).")
    max_new_tokens: int | None = Field(None, ge=1, description="Greedy generation budget; default: generation.sampling.max_new_tokens.")
    batch_size: int = Field(64, ge=1, description="Prompts per batched greedy generate call.")
    checker: str | None = Field(None, description="Answer checker, 'exact' or 'numeric'; default: generation.preprocess.checker.")

    @field_validator("checker")
    @classmethod
    def _known_checker(cls, name: str | None) -> str | None:
        from datasets_pipeline.answers import CHECKERS

        if name is not None and name not in CHECKERS:
            raise ValueError(f"unknown checker {name!r}; known: {sorted(CHECKERS)}")
        return name


class EarlyStoppingConfig(StrictModel):
    """Stop training when the periodic validation metric stops improving (``distillation.eval_every``).

    The best evaluated step, not the last, is the one merged and exported
    (``rayjobs/distillation/early_stopping.py``).
    """

    metric: Literal["val_loss", "val_ce", "val_perplexity", "val_em"] = Field(
        "val_loss", description="Watched metric, one of the periodic evaluation's: token-mean validation loss, "
        "cross-entropy, perplexity, or exact match on eval_em_samples held-out prompts.")
    mode: Literal["auto", "min", "max"] = Field(
        "auto", description="Whether lower or higher is better; 'auto': max for val_em, min for the others.")
    patience: int = Field(3, ge=1, description="Evaluations without an improvement before training stops.")
    min_delta: float = Field(0.0, ge=0.0, description="Least change of the metric that counts as an improvement.")

    @property
    def direction(self) -> Literal["min", "max"]:
        if self.mode != "auto":
            return self.mode
        return "max" if self.metric == "val_em" else "min"


class StudentInitConfig(StrictModel):
    """A student derived from the teacher's own weights (rayjobs/distillation/student_init.py), built by
    `raystill student init` or by `raystill distill` when ``output`` holds no model yet."""

    teacher: str | None = Field(None, description="Model to derive from; default: distillation.teacher.model, "
                                "else generation.teacher. Same architecture family as the student it makes.")
    output: str = Field(description="Local directory the student is written to; distillation.student names it.")
    every_nth: int | None = Field(None, ge=1, description="Keep teacher blocks 0, n, 2n, ... (default 2).")
    layers: list[int] | None = Field(None, min_length=1, description="Teacher blocks to keep (0-based); "
                                     "instead of every_nth.")
    mlp_keep: float | None = Field(None, gt=0.0, le=1.0, description="Keep this share of each kept block's MLP "
                                   "channels, those of largest weight magnitude; null: the full width.")

    @model_validator(mode="after")
    def _one_layer_rule(self):
        if self.layers and self.every_nth:
            raise ValueError("set student_init.layers or student_init.every_nth, not both")
        return self


class DistillationConfig(StrictModel):
    student: str = Field(description="Student model: local dir, s3:// URI or 'demo:student'.")
    data: Location | None = Field(None, description="Generated shards; defaults to generation.output.")
    output: Location = Field(description="Checkpoints, merged model and eval report go here.")
    max_seq_len: int = Field(512, ge=16, description="Student tokens per training sample (prompt + target).")
    context_policy: Literal["truncate", "drop"] = Field(
        "truncate", description="Samples longer than the student's positions (min of max_seq_len and the model's "
        "max_position_embeddings): cut to fit, or left out of training. Both are counted in summary.json.")
    loss: LossConfig = Field(default_factory=LossConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dropout: DropoutConfig = Field(default_factory=DropoutConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    max_failures: int = Field(1, ge=0, description="Worker failures tolerated (restart from last checkpoint).")
    seed: int = Field(0, description="Seeds torch in every worker (new projections, dropout) and each epoch's shuffle.")
    shuffle_buffer: int = Field(
        1024, ge=0, description="Rows in each worker's local shuffle buffer (seeded per epoch); 0 keeps stream order."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate on the val split every N optimizer steps inside training (validation "
        "loss terms, and exact match when eval_em_samples > 0), written to the curves; null: only at the end.")
    eval_em_samples: int = Field(
        0, ge=0, description="With eval_every: greedy exact match on this many held-out prompts at each periodic "
        "evaluation (rank 0 generates; not with ZeRO-3). 0: losses only.")
    student_init: StudentInitConfig | None = Field(
        None, description="Derive the student from the teacher (kept blocks, embeddings, norms, head; optionally "
        "narrower MLPs) into student_init.output, which distillation.student must name.")
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="Stop when the periodic evaluation's metric stops improving; the best evaluated step "
        "is merged and exported. Needs eval_every and val rows.")

    @property
    def service_teacher(self) -> bool:
        """Whether logit KD gets the teacher's top-k from the scoring service."""
        return self.loss.kind == "logit" and self.teacher.source == "service"

    @property
    def online_teacher(self) -> bool:
        """Whether the training workers run the teacher (feature KD, or logit KD with source 'online')."""
        return self.loss.kind == "feature" or (self.loss.kind == "logit" and self.teacher.source == "online")

    @model_validator(mode="after")
    def _student_is_the_initialized_one(self):
        if self.student_init and self.student != self.student_init.output:
            raise ValueError(f"distillation.student ({self.student!r}) must name distillation.student_init.output "
                             f"({self.student_init.output!r}), the student it builds")
        return self

    @model_validator(mode="after")
    def _periodic_eval_settings(self):
        if self.early_stopping and not self.eval_every:
            raise ValueError("distillation.early_stopping needs distillation.eval_every (the evaluations it watches)")
        if self.eval_em_samples and not self.eval_every:
            raise ValueError("distillation.eval_em_samples needs distillation.eval_every")
        if self.early_stopping and self.early_stopping.metric == "val_em" and not self.eval_em_samples:
            raise ValueError("distillation.early_stopping.metric 'val_em' needs distillation.eval_em_samples > 0")
        if self.eval_em_samples and self.deepspeed.zero_stage == 3:
            raise ValueError("distillation.eval_em_samples is not supported with deepspeed.zero_stage 3 (rank 0 "
                             "generates with the full weights); set eval_em_samples: 0 or zero_stage <= 2")
        return self

    @model_validator(mode="after")
    def _online_teacher_unpacked(self):
        if self.online_teacher and self.optim.packing:
            raise ValueError("optim.packing is not supported with an online teacher (its own sequences are "
                             "aligned per sample); set optim.packing: false")
        return self

    @model_validator(mode="after")
    def _optimizer_sees_real_shapes(self):
        # ZeRO (any stage) and DeepSpeed's fp16/bf16 wrappers hand the optimizer flat fp32 copies of each
        # param group: LAMB's per-tensor trust ratio and Adafactor's factored moments would see one vector.
        if self.optim.optimizer != "adamw" and (self.deepspeed.zero_stage or self.deepspeed.precision != "fp32"):
            raise ValueError(f"optim.optimizer '{self.optim.optimizer}' needs deepspeed.zero_stage 0 and precision "
                             "'fp32' (ZeRO and the mixed-precision wrappers flatten parameters, so per-tensor "
                             "trust ratios / factored moments would be computed over one flat vector)")
        return self

    @model_validator(mode="after")
    def _contrastive_needs_teacher_states(self):
        if self.loss.contrastive.weight and not self.online_teacher:
            raise ValueError("distillation.loss.contrastive needs the teacher's hidden states: kind 'feature', or "
                             "kind 'logit' with teacher.source 'online'")
        return self

    @model_validator(mode="after")
    def _on_policy_needs_service(self):
        if self.on_policy.enabled and not self.service_teacher:
            raise ValueError("distillation.on_policy.fraction > 0 needs the teacher scoring service to score the "
                             "student's samples: set distillation.loss.kind 'logit' and distillation.teacher.source "
                             "'service' (or on_policy.fraction: 0)")
        return self
