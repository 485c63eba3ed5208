"""Job: distillation (``python -m rayjobs.distill --config FILE``).

Wires the stage: generated shards -> Ray Data -> ``TorchTrainer`` (``rayjobs.train_loop``, DeepSpeed
in every worker) -> merged HF student -> held-out eval + gate -> curves and ``summary.json``.

Layout under ``distillation.output`` (local or s3://)::

    checkpoints/<run name>/   Ray Train run: DeepSpeed checkpoints, rerun with the same name resumes
    merged/                   the student, LoRA merged in: safetensors + tokenizer + chat template
    curves.jsonl, curves.png  one row per optimizer step (loss terms, LR, tokens/s)
    eval.json                 held-out report (rayjobs.evaluate) with the gate verdict
    summary.json              what run() returns
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

from cluster.connect import ray_init
from cluster.storage import filesystem, is_s3, join, write_bytes
from rayjobs.collate import BASE_COLUMNS, TEACHER_COLUMNS
from rayjobs.online_teacher import ONLINE_COLUMNS
from rayjobs.config import DISTILL_DIGEST_EXCLUDE, ConfigError, PipelineConfig
from rayjobs.distill_config import DistillationConfig, OptimConfig
from rayjobs.entry import run_job
from rayjobs.refs import resolve_data
from rayjobs.train_checkpoints import check_layout, checkpoint_layout

CRASH_ENV = "RAYSTILL_TEST_CRASH_AT_STEP"


@dataclass(frozen=True)
class StepPlan:
    rows: int
    rows_per_worker: int
    micro_batches_per_epoch: int
    total_steps: int


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
    return StepPlan(train_rows, per_worker, micro, total)


def _abs(location: str) -> str:
    """Workers run in other directories: local paths go to them absolute."""
    return location if is_s3(location) else os.path.abspath(location)


def _write_json(location: str, data: dict) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write((json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def data_stats(data: str, context_limit: int) -> dict[str, int]:
    """Rows per split, rows carrying teacher top-k at student positions, rows over the context.

    ``with_teacher_topk`` counts same-tokenizer rows (``teacher_offset >= 0``) and cross-tokenizer
    rows with an alignment; ``xtok`` the latter; ``over_context`` the rows (any split) longer than
    ``context_limit`` student tokens.
    """
    import pyarrow.compute as pc

    from datasets_pipeline.shards import ShardStore

    table = ShardStore(data).read_samples(["split", "topk_k", "teacher_offset", "teacher_align", "input_ids"])
    stats = {split: int(pc.sum(pc.equal(table["split"], split)).as_py() or 0) for split in ("train", "val")}
    xtok = pc.and_(pc.less(table["teacher_offset"], 0),
                   pc.greater(pc.fill_null(pc.list_value_length(table["teacher_align"]), 0), 0))
    with_topk = pc.and_(pc.greater(table["topk_k"], 0), pc.or_(pc.greater_equal(table["teacher_offset"], 0), xtok))
    stats["with_teacher_topk"] = int(pc.sum(with_topk).as_py() or 0)
    stats["xtok"] = int(pc.sum(pc.and_(pc.greater(table["topk_k"], 0), xtok)).as_py() or 0)
    over = pc.greater(pc.list_value_length(table["input_ids"]), context_limit)
    stats["over_context"] = int(pc.sum(over).as_py() or 0)
    stats["over_context_train"] = int(pc.sum(pc.and_(over, pc.equal(table["split"], "train"))).as_py() or 0)
    return stats


def model_config(location: str) -> dict:
    """A model directory's ``config.json`` (local or s3://), without fetching the weights."""
    fs, path = filesystem(join(location, "config.json"))
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


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
    return list(BASE_COLUMNS + (TEACHER_COLUMNS if d.loss.kind == "logit" else ()))


def build_datasets(data: str, columns: list[str], stats: dict[str, int], drop_over: int | None = None) -> dict:
    """Lazy Ray Datasets over the committed shards, one per split present; nothing is read here.

    ``drop_over``: leave out rows with more student tokens than this (``context_policy: drop``).
    """
    from ray.data.expressions import col

    from datasets_pipeline.shards import ShardStore
    from datasets_pipeline.sources import read_parquet

    store = ShardStore(data)
    files = store.sample_files()
    out = {}
    for split in ("train", "val"):
        if stats.get(split):
            # The column projection is pushed down into the Parquet read.
            ds = read_parquet(files, filesystem=store.fs).select_columns([*columns, "split"])
            keep = col("split") == split
            if drop_over is not None:
                keep = keep & (col("input_ids").list.len() <= drop_over)
            out[split] = ds.filter(expr=keep).select_columns(columns)
    return out


def build_loop_config(cfg: PipelineConfig, student: str, total_steps: int, storage: str, has_val: bool,
                      max_seq_len: int) -> dict:
    d = cfg.distillation
    loop = {
        "distillation": d.model_dump(mode="json"),
        "student": student,
        "teacher": _abs(resolve_data(d.teacher.model)) if d.online_teacher else None,
        "max_seq_len": max_seq_len,
        "total_steps": total_steps,
        "merged_location": join(_abs(d.output), "merged"),
        "run_dir": join(storage, cfg.name),
        "has_val": has_val,
    }
    crash_at = os.environ.get(CRASH_ENV)
    if crash_at:
        loop["crash_at_step"] = int(crash_at)
        loop["crash_marker"] = join(storage, cfg.name, f".test-crash-at-{int(crash_at)}")
    return loop


def _run_config(cfg: PipelineConfig, storage: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    kwargs = {}
    if is_s3(storage):
        kwargs["storage_filesystem"], kwargs["storage_path"] = filesystem(storage)
    else:
        kwargs["storage_path"] = storage
    return RunConfig(
        name=cfg.name,
        failure_config=FailureConfig(max_failures=cfg.distillation.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        **kwargs,
    )


def _read_trainer_state(checkpoint) -> dict:
    from rayjobs.train_checkpoints import STATE_FILE

    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
        return json.loads(f.read().decode())


def train(cfg: PipelineConfig, log=print) -> dict:
    """Run the TorchTrainer to completion (or resume it); returns the final trainer state.

    Starts or joins Ray itself (``ray_init`` is idempotent), so the bench and tests can call it.
    """
    from ray.data import ExecutionOptions
    from ray.train import DataConfig
    from ray.train import ScalingConfig as RayScalingConfig
    from ray.train.torch import TorchTrainer

    from rayjobs.train_loop import train_loop_per_worker

    d = cfg.distillation
    data = _abs(resolve_data(d.data))
    student = _abs(resolve_data(d.student))
    ray_init(cfg.cluster)
    student_config = model_config(student)
    limit = context_limit(d, student_config)
    stats = data_stats(data, limit)
    check_supported(d, stats)
    if d.online_teacher:
        check_models(d, student_config, model_config(_abs(resolve_data(d.teacher.model))))
    context = context_report(d, limit, stats)
    dropped = stats["over_context_train"] if d.context_policy == "drop" else 0
    plan = plan_steps(stats["train"] - dropped, d.optim, d.scaling.num_workers)
    log(f"distill: {plan.rows} train rows, {stats['val']} val rows; {plan.total_steps} optimizer steps "
        f"({plan.micro_batches_per_epoch} micro-batches per worker-epoch, {d.scaling.num_workers} workers)")
    if context["over_limit"]:
        log(f"distill: {context['over_limit']} rows are longer than the student's {limit} positions: "
            f"{'dropped' if d.context_policy == 'drop' else 'truncated'} (distillation.context_policy)")
    if d.loss.kind == "logit" and not d.online_teacher and stats["with_teacher_topk"] < stats["train"] + stats["val"]:
        log(f"distill: warning: only {stats['with_teacher_topk']} of {stats['train'] + stats['val']} rows carry "
            "aligned teacher top-k; the others train on cross-entropy alone")
    storage = join(_abs(d.output), "checkpoints")
    check_layout(join(storage, cfg.name), checkpoint_layout(d), cfg.name)
    resources = {"CPU": d.scaling.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=build_loop_config(cfg, student, plan.total_steps, storage, has_val=stats["val"] > 0,
                                            max_seq_len=limit),
        scaling_config=RayScalingConfig(num_workers=d.scaling.num_workers, use_gpu=d.scaling.use_gpu,
                                        resources_per_worker=resources),
        run_config=_run_config(cfg, storage),
        datasets=build_datasets(data, training_columns(d), stats, drop_over=limit if dropped else None),
        # Per-worker order must be reproducible for resume to replay the same batches.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    state = _read_trainer_state(result.checkpoint)
    state["checkpoint"] = result.checkpoint.path
    state["total_steps"] = plan.total_steps
    state["rows"] = stats
    state["context"] = context
    return state


def evaluate(cfg: PipelineConfig, merged: str) -> dict:
    """The held-out eval as one Ray task (on a GPU when training used GPUs), plus the gate."""
    import ray

    from cluster.storage import localize
    from rayjobs.evaluate import check_gate, evaluate_model

    d = cfg.distillation
    options = {"num_cpus": 1, "num_gpus": 1 if d.scaling.use_gpu else 0}

    def _task(**kwargs):
        return evaluate_model(localize(kwargs.pop("model_dir")), **kwargs)

    report = ray.get(ray.remote(_task).options(**options).remote(
        model_dir=merged,
        data_location=_abs(resolve_data(d.data)),
        checker=d.eval.checker or cfg.generation.preprocess.checker,
        max_new_tokens=d.eval.max_new_tokens or cfg.generation.sampling.max_new_tokens,
        limit=d.eval.limit,
        batch_size=d.eval.batch_size,
        max_seq_len=d.max_seq_len,
        device="cuda" if d.scaling.use_gpu else "cpu",
    ))
    report["gate"] = check_gate(report, d.gate)
    return report


def check_supported(d: DistillationConfig, stats: dict[str, int] | None = None) -> None:
    """Refuse, before any worker starts, what the stage cannot do or would do silently wrong.

    ``ConfigError``: the CLI prints it as one line and exits 2, like any config problem.
    """
    if d.deepspeed.precision == "fp16" and not d.scaling.use_gpu:
        raise ConfigError("distillation.deepspeed.precision='fp16' needs GPU workers; use 'bf16' or 'fp32' on CPU")
    if stats is None:
        return
    if not stats["train"]:
        raise ConfigError(f"no 'train' rows in the committed shards at {d.data}")
    if d.loss.kind == "logit" and not d.online_teacher and not stats["with_teacher_topk"]:
        raise ConfigError("distillation.loss.kind='logit' needs stored teacher top-k at the student's positions, and "
                         "no row has it: generate with generation.sampling.logprobs_topk > 0 and preprocess.reasoning "
                         "'keep' (or set distillation.teacher.source: online)")


def check_models(d: DistillationConfig, student: dict, teacher: dict) -> None:
    """Online teacher: the layer map must fit both depths (``ConfigError`` naming the field)."""
    from rayjobs.batch_loss import feature_settings

    if d.loss.kind != "feature":
        return
    try:
        feature_settings(d, student["num_hidden_layers"], teacher["num_hidden_layers"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run(cfg: PipelineConfig, log=print) -> dict:
    """Train (or resume), merge, evaluate, gate; writes and returns ``summary.json``'s dict.

    Keys: ``steps``/``total_steps``, ``tokens``, ``train_tokens_per_s`` (steady state),
    ``final_loss``, ``val`` (worker-side val loss), ``restarts`` (starts from a checkpoint, a
    rerun of a finished run included) and ``restored_from_steps``, ``merged``, ``checkpoint``,
    ``curves``, ``eval`` (headline metrics; the full report is ``eval_report``; ``student_em_after``
    and ``teacher_agreement`` repeat two of them at the top), ``context`` (samples longer than the
    student's positions and what ``context_policy`` did with them), ``gate``
    (``passed`` + per-threshold ``checks``), ``config_digest``, ``wall_s``. A failed gate is
    reported, not raised: the caller decides whether to deploy.
    """
    from rayjobs.curves import steady_tokens_per_s, write_curves

    d = cfg.distillation
    check_supported(d)
    started = time.perf_counter()
    output = _abs(d.output)
    state = train(cfg, log)
    history = state["history"]
    curves = {"jsonl": join(output, "curves.jsonl"), "png": join(output, "curves.png")}
    write_curves(history, curves["jsonl"], curves["png"], title=f"{cfg.name}: distillation")
    merged = state["final"]["merged"]
    log(f"distill: trained {state['step']} steps, merged student at {merged}; evaluating")
    report = evaluate(cfg, merged)
    eval_path = join(output, "eval.json")
    _write_json(eval_path, report)
    final = state["final"]
    summary = {
        "run": cfg.name,
        "config_digest": cfg.digest(exclude=DISTILL_DIGEST_EXCLUDE),
        "steps": state["step"],
        "total_steps": state["total_steps"],
        "epochs_completed": state["epoch"],
        "rows": state["rows"],
        "tokens": state["tokens"],
        "train_tokens_per_s": steady_tokens_per_s(history),
        "final_loss": {k: final.get(k) for k in ("loss", "ce", "kd")},
        "val": {k: v for k, v in final.items() if k.startswith("val_")},
        "restarts": state["attempt"],
        "restored_from_steps": state["restored_from"],
        "merged": merged,
        "checkpoint": state["checkpoint"],
        "curves": curves,
        "eval": {k: report.get(k) for k in ("n", "em", "token_f1", "teacher_agreement", "perplexity", "tokens_per_s")},
        "student_em_after": report.get("em"),
        "teacher_agreement": report.get("teacher_agreement"),
        "loss_kind": d.loss.kind,
        "context": state["context"],
        "eval_report": eval_path,
        "gate": report["gate"],
        "wall_s": time.perf_counter() - started,
    }
    _write_json(join(output, "summary.json"), summary)
    verdict = "PASSED" if report["gate"]["passed"] else "FAILED"
    log(f"distill: eval em={report.get('em')} teacher_agreement={report.get('teacher_agreement')} "
        f"perplexity={report.get('perplexity')}; gate {verdict}; summary at {join(output, 'summary.json')}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())
