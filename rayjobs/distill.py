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
from rayjobs.config import ConfigError, PipelineConfig
from rayjobs.distill_config import DistillationConfig, OptimConfig
from rayjobs.entry import run_job
from rayjobs.refs import resolve_data

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


def data_stats(data: str) -> dict[str, int]:
    """Rows per split and rows carrying aligned teacher top-k, from three small columns."""
    import pyarrow.compute as pc

    from datasets_pipeline.shards import ShardStore

    table = ShardStore(data).read_samples(["split", "topk_k", "teacher_offset"])
    stats = {split: int(pc.sum(pc.equal(table["split"], split)).as_py() or 0) for split in ("train", "val")}
    with_topk = pc.and_(pc.greater(table["topk_k"], 0), pc.greater_equal(table["teacher_offset"], 0))
    stats["with_teacher_topk"] = int(pc.sum(with_topk).as_py() or 0)
    return stats


def training_columns(d: DistillationConfig) -> list[str]:
    return list(BASE_COLUMNS + (TEACHER_COLUMNS if d.loss.kind == "logit" else ()))


def build_datasets(data: str, columns: list[str], stats: dict[str, int]) -> dict:
    """Lazy Ray Datasets over the committed shards, one per split present; nothing is read here."""
    import ray.data
    from ray.data.expressions import col

    from datasets_pipeline.shards import ShardStore

    store = ShardStore(data)
    files = store.sample_files()
    out = {}
    for split in ("train", "val"):
        if stats.get(split):
            # Ray Data pushes the projection and the predicate down into the Parquet read.
            ds = ray.data.read_parquet(files, filesystem=store.fs).select_columns([*columns, "split"])
            out[split] = ds.filter(expr=col("split") == split).select_columns(columns)
    return out


def build_loop_config(cfg: PipelineConfig, student: str, total_steps: int, storage: str, has_val: bool) -> dict:
    d = cfg.distillation
    loop = {
        "distillation": d.model_dump(mode="json"),
        "student": student,
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
    from rayjobs.train_loop import STATE_FILE

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
    ray_init(cfg.cluster)
    stats = data_stats(data)
    check_supported(d, stats)
    plan = plan_steps(stats["train"], d.optim, d.scaling.num_workers)
    log(f"distill: {plan.rows} train rows, {stats['val']} val rows; {plan.total_steps} optimizer steps "
        f"({plan.micro_batches_per_epoch} micro-batches per worker-epoch, {d.scaling.num_workers} workers)")
    if d.loss.kind == "logit" and stats["with_teacher_topk"] < stats["train"] + stats["val"]:
        log(f"distill: warning: only {stats['with_teacher_topk']} of {stats['train'] + stats['val']} rows carry "
            "aligned teacher top-k; the others train on cross-entropy alone")
    storage = join(_abs(d.output), "checkpoints")
    resources = {"CPU": d.scaling.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=build_loop_config(cfg, _abs(resolve_data(d.student)), plan.total_steps, storage,
                                            has_val=stats["val"] > 0),
        scaling_config=RayScalingConfig(num_workers=d.scaling.num_workers, use_gpu=d.scaling.use_gpu,
                                        resources_per_worker=resources),
        run_config=_run_config(cfg, storage),
        datasets=build_datasets(data, training_columns(d), stats),
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
    if d.loss.kind == "feature":
        raise ConfigError("distillation.loss.kind='feature' (hidden-state distillation) is not implemented yet; "
                         "use 'data' (cross-entropy on the teacher's text) or 'logit' (top-k KD)")
    if d.deepspeed.precision == "fp16" and not d.scaling.use_gpu:
        raise ConfigError("distillation.deepspeed.precision='fp16' needs GPU workers; use 'bf16' or 'fp32' on CPU")
    if stats is None:
        return
    if not stats["train"]:
        raise ConfigError(f"no 'train' rows in the committed shards at {d.data}")
    if d.loss.kind == "logit" and not stats["with_teacher_topk"]:
        raise ConfigError("distillation.loss.kind='logit' needs teacher top-k aligned with the student's tokens, and "
                         "no row has it: generate with generation.sampling.logprobs_topk > 0 and a student that "
                         "shares the teacher's tokenizer (cross-tokenizer KD is not implemented yet)")


def run(cfg: PipelineConfig, log=print) -> dict:
    """Train (or resume), merge, evaluate, gate; writes and returns ``summary.json``'s dict.

    Keys: ``steps``/``total_steps``, ``tokens``, ``train_tokens_per_s`` (steady state),
    ``final_loss``, ``val`` (worker-side val loss), ``restarts`` (starts from a checkpoint, a
    rerun of a finished run included) and ``restored_from_steps``, ``merged``, ``checkpoint``,
    ``curves``, ``eval`` (headline metrics; the full report is ``eval_report``), ``gate``
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
        "config_digest": cfg.digest(),
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
