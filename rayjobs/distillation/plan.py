"""Pure planning for a distillation run: steps, context limits, columns, what is supported.

Everything the driver decides before a worker starts, as plain functions of the config, the
data's counts and the models' ``config.json``: no Ray, no torch, testable in milliseconds.
A refusal is a ``ConfigError`` (one line, exit 2), never a failure inside a worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.errors import ConfigError
from rayjobs.distillation.collate import BASE_COLUMNS, TEACHER_COLUMNS
from rayjobs.distillation.config import SUPPLIED_UNSCORED, DistillationConfig, OptimConfig
from rayjobs.distillation.online_teacher import ONLINE_COLUMNS
from rayjobs.distillation.service_teacher import SERVICE_COLUMNS


@dataclass(frozen=True)
class StepPlan:
    rows: int
    rows_per_worker: int
    micro_batches_per_epoch: int
    total_steps: int
    steps_per_epoch: float = 0.0  # optimizer steps per pass over a worker's shard (temperature phases in epochs)


def plan_steps(train_rows: int, optim: OptimConfig, num_workers: int) -> StepPlan:
    """Optimizer steps for the run: ``max_steps``, else ``epochs`` over each worker's shard.

    Ray Train splits the stream equally (``streaming_split(equal=True)``), so every worker sees
    ``rows // num_workers`` rows per epoch; the last micro-batch of an epoch may be short.
    """
    per_worker = train_rows // num_workers
    if per_worker == 0:
        raise ValueError(f"{train_rows} training rows cannot feed {num_workers} workers")
    micro = math.ceil(per_worker / optim.micro_batch_size)
    total = optim.max_steps or max(1, math.ceil(optim.epochs * micro / optim.grad_accum))
    return StepPlan(train_rows, per_worker, micro, total, micro / optim.grad_accum)


def context_limit(d: DistillationConfig, student: dict) -> int:
    """Student positions a sample may use: ``max_seq_len``, capped by the model's own positions."""
    positions = student.get("max_position_embeddings")
    return min(d.max_seq_len, positions) if positions else d.max_seq_len


def context_report(d: DistillationConfig, limit: int, stats: dict[str, int]) -> dict:
    """What ``context_policy`` did to samples longer than the student's positions (for summary.json)."""
    over = stats["over_context"]
    return {"limit": limit, "policy": d.context_policy, "over_limit": over,
            "truncated": over if d.context_policy == "truncate" else 0,
            "dropped": over if d.context_policy == "drop" else 0}


def training_columns(d: DistillationConfig) -> list[str]:
    if d.online_teacher:
        return list(BASE_COLUMNS + ONLINE_COLUMNS)
    if d.service_teacher:
        return list(BASE_COLUMNS + SERVICE_COLUMNS)
    return list(BASE_COLUMNS + (TEACHER_COLUMNS if d.loss.kind == "logit" else ()))


def check_supported(d: DistillationConfig, stats: dict[str, int] | None = None) -> None:
    """Refuse, before any worker starts, what the stage cannot do or would do silently wrong."""
    if d.deepspeed.precision == "fp16" and not d.scaling.use_gpu:
        raise ConfigError("distillation.deepspeed.precision='fp16' needs GPU workers; use 'bf16' or 'fp32' on CPU")
    if stats is None:
        return
    if not stats["train"]:
        raise ConfigError(f"no 'train' rows in the committed shards at {d.data}")
    if d.early_stopping and not stats["val"]:
        raise ConfigError(f"distillation.early_stopping watches the 'val' split, and the shards at {d.data} have "
                          "none: generate with generation.preprocess.val_fraction > 0, or remove early_stopping")
    if d.loss.kind == "logit" and d.teacher.source == "stored" and not stats["with_teacher_topk"]:
        raise ConfigError("distillation.loss.kind='logit' needs stored teacher top-k at the student's positions, and "
                          "no row has it: generate with generation.sampling.logprobs_topk > 0 and preprocess.reasoning "
                          "'keep' (or set distillation.teacher.source: online or service)")


def check_teacher_signal(d: DistillationConfig, manifest: dict | None) -> None:
    """Stored-top-k logit KD on shards whose manifest says their samples were supplied and not scored:
    refused naming the knob, before Ray starts (the shards may come from another config than this one)."""
    if d.loss.kind != "logit" or d.online_teacher or d.service_teacher or not manifest:
        return
    if manifest.get("samples_source") == "supplied" and not manifest.get("topk_k"):
        raise ConfigError(f"{SUPPLIED_UNSCORED} (the shards at {d.data} hold supplied samples without them)")


def check_models(d: DistillationConfig, student: dict, teacher: dict) -> None:
    """Online teacher: the layer map and the contrastive layers must fit both depths (``ConfigError``
    naming the field)."""
    from rayjobs.distillation.batch_loss import feature_settings

    c = d.loss.contrastive
    for name, index, model in (("student_layer", c.student_layer, student),
                               ("teacher_layer", c.teacher_layer, teacher)):
        states = model["num_hidden_layers"] + 1
        if c.weight and not -states <= index < states:
            raise ConfigError(f"distillation.loss.contrastive.{name} {index} is outside the {states} hidden states "
                              f"(0..{states - 1}, or negative from the last)")
    if d.loss.kind != "feature":
        return
    try:
        feature_settings(d, student["num_hidden_layers"], teacher["num_hidden_layers"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def stored_teacher_tokenizer(d: DistillationConfig, manifest: dict | None, stats: dict[str, int], data: str) -> str | None:
    """Where workers load the tokenizer of the shards' teacher ids, or None when they need none.

    Stored cross-tokenizer top-k with ``loss.xtok.method: vocab_map`` keeps the teacher's ids; the
    collate maps them to student ids through the cached vocabulary map of the tokenizer pair, so
    the workers need the teacher's tokenizer (files only) that the manifest records. Shards whose
    manifest predates that record cannot be mapped and are refused (regenerate them).
    """
    stored = d.loss.kind == "logit" and not d.online_teacher and not d.service_teacher
    if not stored or d.loss.xtok.method != "vocab_map" or not stats.get("xtok"):
        return None
    recorded = ((manifest or {}).get("tokenizers") or {}).get("teacher")
    if not recorded or not recorded.get("path"):
        raise ConfigError(
            f"the shards at {data} hold {stats['xtok']} cross-tokenizer rows but their manifest does not record "
            "the teacher's tokenizer, which training now needs to map the teacher's top-k ids to student ids "
            "(they are no longer stored per token): regenerate the shards, or set distillation.loss.xtok.method: uld")
    return recorded["path"]


def check_student_tokenizer(recorded: dict | None, student: str, student_hash: str, data: str) -> None:
    """Refuse shards made for another student tokenizer: their ``input_ids`` and ``teacher_align``
    are that tokenizer's ids and positions, and would train this student on the wrong tokens
    without any error. ``recorded`` is the manifest's ``tokenizers.student``
    (``datasets_pipeline.vocab_cache.tokenizer_records``); shards written before it was recorded
    (None) are not checked.
    """
    if not recorded or recorded.get("sha256") == student_hash:
        return
    raise ConfigError(
        f"the shards at {data} were made for the student tokenizer at {recorded.get('path')} "
        f"(sha256 {str(recorded.get('sha256'))[:16]}), but distillation.student {student} has another "
        f"tokenizer (sha256 {student_hash[:16]}): set distillation.student to a model with the shards' "
        "tokenizer, or regenerate with generation.student_tokenizer set to this student and point "
        "distillation.data at that output"
    )
