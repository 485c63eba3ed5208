"""The driver's side of the distillation stage: Ray Data over the shards, the ``TorchTrainer``
(each worker runs ``worker.train_loop_per_worker`` with DeepSpeed), and the held-out evaluation
as a Ray task. Thin wiring around the pure ``plan`` and the worker; the job
(``rayjobs.distill``) resolves references and writes the summary.
"""

from __future__ import annotations

import os

from cluster.model_refs import is_hub_id
from cluster.ray_data import read_parquet
from cluster.storage import filesystem, is_s3, join
from rayjobs.distillation.checkpoints import read_trainer_state
from rayjobs.distillation.config import DistillationConfig

CRASH_ENV = "RAYSTILL_TEST_CRASH_AT_STEP"


def absolute(location: str) -> str:
    """Workers run in other directories: local paths go to them absolute (s3:// and hub ids as they are)."""
    return location if is_s3(location) or is_hub_id(location) else os.path.abspath(location)


def build_datasets(files: list[str], fs, columns: list[str], stats: dict[str, int],
                   drop_over: int | None = None) -> dict:
    """Lazy Ray Datasets over the committed sample files, one per split present; nothing is read here.

    ``drop_over``: leave out rows with more student tokens than this (``context_policy: drop``).
    """
    from ray.data.expressions import col

    out = {}
    for split in ("train", "val"):
        if stats.get(split):
            # The column projection is pushed down into the Parquet read.
            ds = read_parquet(files, filesystem=fs).select_columns([*columns, "split"])
            keep = col("split") == split
            if drop_over is not None:
                keep = keep & (col("input_ids").list.len() <= drop_over)
            out[split] = ds.filter(expr=keep).select_columns(columns)
    return out


def candidate_location(d: DistillationConfig, run_name: str) -> str:
    """A fresh directory for this training's merged student: never the served one (``merged/``
    points at a version only after it passed the gate)."""
    import time

    return join(absolute(d.output), "versions", f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def build_loop_config(d: DistillationConfig, run_name: str, *, student: str, teacher: str | None,
                      total_steps: int, storage: str, has_val: bool, max_seq_len: int,
                      teacher_tokenizer: str | None = None, em_sample: dict | None = None,
                      steps_per_epoch: float = 0.0) -> dict:
    """What every worker gets: the stage config, resolved paths and the step plan.

    ``teacher``: the online or service teacher; ``teacher_tokenizer``: the tokenizer of stored
    cross-tokenizer top-k ids (``plan.stored_teacher_tokenizer``), tokenizer files only;
    ``em_sample``: ``validation.EmSample``'s fields, for exact match at each periodic evaluation.
    """
    loop = {
        "distillation": d.model_dump(mode="json"),
        "student": student,
        "teacher": teacher,
        "teacher_tokenizer": teacher_tokenizer,
        "max_seq_len": max_seq_len,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "merged_location": candidate_location(d, run_name),
        "run_dir": join(storage, run_name),
        "has_val": has_val,
        "em_sample": em_sample,
    }
    if d.on_policy.enabled:
        from rayjobs.distillation.sampler import actor_name

        loop["sampler"] = actor_name(run_name)
    crash_at = os.environ.get(CRASH_ENV)
    if crash_at:
        loop["crash_at_step"] = int(crash_at)
        loop["crash_marker"] = join(storage, run_name, f".test-crash-at-{int(crash_at)}")
    return loop


def run_config(d: DistillationConfig, run_name: str, storage: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    kwargs = {}
    if is_s3(storage):
        kwargs["storage_filesystem"], kwargs["storage_path"] = filesystem(storage)
    else:
        kwargs["storage_path"] = storage
    return RunConfig(
        name=run_name,
        failure_config=FailureConfig(max_failures=d.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        **kwargs,
    )


def fit(d: DistillationConfig, run_name: str, loop_config: dict, datasets: dict, storage: str) -> dict:
    """Run the TorchTrainer to completion (or resume it); returns the final trainer state."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig
    from ray.train import ScalingConfig as RayScalingConfig
    from ray.train.torch import TorchTrainer

    from rayjobs.distillation.worker import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=RayScalingConfig(num_workers=d.scaling.num_workers, use_gpu=d.scaling.use_gpu,
                                        resources_per_worker={"CPU": d.scaling.cpus_per_worker},
                                        placement_strategy=d.scaling.placement_strategy),
        run_config=run_config(d, run_name, storage),
        datasets=datasets,
        # Per-worker order must be reproducible for resume to replay the same batches.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    sampler = None
    if d.on_policy.enabled:  # outlives worker-group restarts: a resumed attempt refreshes it
        from rayjobs.distillation.sampler import start

        sampler = start(d.on_policy, loop_config["student"], run_name, loop_config["max_seq_len"], d.seed)
    try:
        result = trainer.fit()
    finally:
        if sampler is not None:
            import ray

            ray.kill(sampler)
    if result.error:
        raise result.error
    state = read_trainer_state(result.checkpoint)
    state["checkpoint"] = result.checkpoint.path
    return state


def evaluate_remote(d: DistillationConfig, merged: str, records: list[dict], checker: str, max_new_tokens: int) -> dict:
    """The held-out eval as one Ray task (on a GPU when training used GPUs), plus the gate."""
    import ray

    from cluster.storage import localize
    from rayjobs.distillation.evaluate import check_gate, evaluate_model

    options = {"num_cpus": 1, "num_gpus": 1 if d.scaling.use_gpu else 0}

    def _task(**kwargs):
        return evaluate_model(localize(kwargs.pop("model_dir")), **kwargs)

    report = ray.get(ray.remote(_task).options(**options).remote(
        model_dir=merged,
        records=records,
        checker=d.eval.checker or checker,
        max_new_tokens=d.eval.max_new_tokens or max_new_tokens,
        limit=d.eval.limit,
        batch_size=d.eval.batch_size,
        max_seq_len=d.max_seq_len,
        device="cuda" if d.scaling.use_gpu else "cpu",
        chunk_tokens=d.loss.chunk_tokens,
    ))
    report["gate"] = check_gate(report, d.gate)
    return report
