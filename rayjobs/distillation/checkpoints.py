"""Checkpoints of the distillation train loop, and resuming from them.

Checkpoints. Every ``checkpoint_every`` optimizer steps and once at the end, each rank writes its
DeepSpeed shard (model, optimizer, LR scheduler, step counters) into a local directory and
``ray.train.report`` merges all ranks' directories into one checkpoint under
``<output>/checkpoints/<run name>/``. Rank 0 adds ``trainer_state.json`` (the step, the data
position and the per-step curve rows so far) and, once every rank has uploaded, a ``COMMITTED``
file. Resuming takes the newest of Ray Train's registered checkpoint and the committed ones (see
``find_checkpoint``: the controller registers a report only when it next polls the worker).

What "resume" means. A restarted worker group (``FailureConfig``) or a rerun with the same run name
loads the latest checkpoint: weights, optimizer moments, LR schedule and step count are restored
exactly. The data iterator cannot be restored mid-stream, so it is *replayed*: the worker restarts
the epoch recorded in the checkpoint with the same shuffle seed (``seed + epoch``) and skips the
micro-batches it had already consumed in that epoch. With one worker the stream order is
deterministic (``preserve_order``), so the resumed run trains on exactly the batches the
uninterrupted run would have. With several workers Ray Data may hand rows to a different rank after
a restart: each rank still skips its count, so the number of samples seen is exact but which rank
sees which sample may differ. Curve rows after the checkpoint that the failed attempt had produced
are dropped with it, so the final curve has each step exactly once; ``attempt`` says which start
produced a row. Replaying re-reads the skipped micro-batches, a cost that grows with the position
in the epoch. Rerunning a finished run finds its final checkpoint: it trains nothing, and exports
and evaluates again.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

from cluster.storage import filesystem, join, read_bytes, write_json
from cluster.errors import UserError

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"
COMMIT_FILE = "COMMITTED"
LAYOUT_FILE = "checkpoint_layout.json"


def _checkpoint_dirs(run_dir: str):
    """``(filesystem, [paths])`` of the directories directly under ``run_dir`` (none if it is missing)."""
    from pyarrow import fs as pafs

    fs, root = filesystem(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return fs, [i.path for i in infos if i.type == pafs.FileType.Directory]


def _has_checkpoints(run_dir: str) -> bool:
    from pyarrow import fs as pafs

    fs, dirs = _checkpoint_dirs(run_dir)
    return any(fs.get_file_info(f"{d}/{STATE_FILE}").type == pafs.FileType.File for d in dirs)


def checkpoint_layout(d) -> dict:
    """The settings a DeepSpeed checkpoint's shapes and sharding depend on (``d``: DistillationConfig).

    Anything else (learning rate, steps, loss weights, data) may change between a run and its
    resume; a change here makes ``load_checkpoint`` fail deep inside DeepSpeed on mismatched keys,
    sizes or partition counts.
    """
    lora = d.lora.model_dump(mode="json", include={"r", "target_modules", "modules_to_save"})
    return {
        "student": d.student,
        "lora": lora if d.lora.enabled else None,
        # Feature distillation adds one projection per mapped layer, student width -> teacher width.
        "feature": {"layer_map": d.loss.feature.layer_map, "teacher": d.teacher.model}
        if d.loss.kind == "feature" else None,
        "zero_stage": d.deepspeed.zero_stage,
        "precision": d.deepspeed.precision,
        "num_workers": d.scaling.num_workers,
        # Layer-wise LR decay splits the optimizer into one parameter group per layer: another
        # group count cannot load the saved optimizer state. (Only when on, so layouts written
        # before this key existed still match a run without it.)
        **({"layerwise_lr_groups": True} if d.optim.layerwise_lr_decay is not None else {}),
        # Another optimizer keeps other state; the contrastive projection is a module of its own.
        **({"optimizer": d.optim.optimizer} if d.optim.optimizer != "adamw" else {}),
        **({"contrastive": True} if d.loss.contrastive.weight else {}),
    }


class LayoutChanged(UserError):
    """A rerun would resume checkpoints written with another layout (the resume guard)."""


def layout_changes(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every setting that differs."""
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]


def check_layout(run_dir: str, layout: dict, run_name: str) -> None:
    """Refuse to resume checkpoints written for another layout; record the layout of a new run.

    Called by the driver before any worker starts, so a changed model fails in a second with the
    settings named, not after a worker group start in DeepSpeed's state-dict loader.
    """
    location = join(run_dir, LAYOUT_FILE)
    raw = read_bytes(location)
    if raw is None:
        # Checkpoints without a layout file come from a version that did not write one: their
        # layout is unknown, so none is claimed for them.
        if not _has_checkpoints(run_dir):
            write_json(location, layout)
        return
    changes = layout_changes(json.loads(raw.decode()), layout)
    if not changes:
        return
    if _has_checkpoints(run_dir):
        raise LayoutChanged(
            f"run '{run_name}' has checkpoints in {run_dir} written with other settings, and resuming "
            f"would load them: {'; '.join(changes)}. Give this run another name (--set name=...) or "
            f"another distillation.output, or delete {run_dir} to start over."
        )
    write_json(location, layout)  # an earlier start never checkpointed


@dataclass
class TrainerState:
    """What rank 0 writes beside the DeepSpeed shards; every rank reads it back on resume."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens: int = 0
    attempt: int = 0
    restored_from: list[int] = field(default_factory=list)
    sampler_step: int = 0  # on-policy: the step of the sampler's weights (a resume refreshes it)
    on_policy_batches: int = 0  # on-policy micro-batches rank 0 trained on so far
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    # Early stopping (rayjobs.distillation.early_stopping): the best evaluation so far and where its
    # weights were exported; the step training stopped at, if it stopped early.
    best: dict = field(default_factory=dict)
    stopped_at: int | None = None

    def save(self, directory: str) -> None:
        """Compact JSON into the local directory that becomes the checkpoint, beside DeepSpeed's shards.

        Plain file I/O, as DeepSpeed's: Ray Train uploads the directory, which is never an S3
        location; ``cluster.storage.write_json`` would also indent ``history``, a row per step.
        """
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(asdict(self), f)


def read_trainer_state(checkpoint) -> dict:
    """The ``TrainerState`` fields of a Ray Train checkpoint, read where it is stored (local or S3)
    without fetching the DeepSpeed shards beside them."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
        return json.loads(f.read().decode())


class Checkpointer:
    """Writes every rank's DeepSpeed shard plus rank 0's ``TrainerState`` as one Ray Train checkpoint."""

    def __init__(self, engine, state: TrainerState, rank: int, world: int, run_dir: str):
        self.engine, self.state, self.rank, self.world, self.run_dir = engine, state, rank, world, run_dir

    def save(self, metrics: dict, name: str) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            self.engine.save_checkpoint(d, tag=DS_TAG)
            if self.rank == 0:
                self.state.save(d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
        # Every rank has uploaded its shard once all pass the barrier; only then is it committed.
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        if self.rank == 0:
            write_json(join(self.run_dir, name, COMMIT_FILE), {"step": self.state.step})


def find_checkpoint(run_dir: str):
    """The newest checkpoint: Ray Train's registered one, or a newer committed one in ``run_dir``.

    The Train controller registers a reported checkpoint when it next polls the worker (every
    ~2 s); a worker that dies in between leaves a complete checkpoint the controller never saw,
    and resuming from the one before would repeat a whole interval. The commit file, written
    after every rank uploaded, marks such checkpoints as safe to resume from.
    """
    import ray.train

    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        candidates.append((int(read_trainer_state(registered)["step"]), 1, registered))
    fs, dirs = _checkpoint_dirs(run_dir)
    for path in dirs:
        try:
            with fs.open_input_stream(f"{path}/{COMMIT_FILE}") as f:
                step = int(json.loads(f.read().decode())["step"])
        except (FileNotFoundError, OSError, ValueError, KeyError):
            continue
        candidates.append((step, 0, ray.train.Checkpoint(path, filesystem=fs)))
    return max(candidates, key=lambda c: c[:2])[2] if candidates else None


def restore(engine, state: TrainerState, run_dir: str) -> TrainerState:
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        return state
    base_lrs = [group["initial_lr"] for group in engine.optimizer.param_groups]
    with checkpoint.as_directory() as d:
        try:
            engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        except Exception as e:  # DeepSpeed's own message names tensors, not the setting that changed
            raise RuntimeError(
                f"cannot resume from {checkpoint.path}: it does not fit this run's model or sharding "
                f"(student, LoRA, feature distillation, ZeRO stage, precision or worker count changed?). "
                f"Give the run another name or output, or delete {run_dir}. DeepSpeed: {str(e)[:300]}"
            ) from e
    restored = TrainerState(**read_trainer_state(checkpoint))
    if restored.step != engine.global_steps:
        raise RuntimeError(f"checkpoint state step {restored.step} != DeepSpeed step {engine.global_steps}")
    _keep_current_lrs(engine, base_lrs)
    restored.attempt += 1
    restored.restored_from.append(restored.step)
    return restored


def _keep_current_lrs(engine, base_lrs: list[float]) -> None:
    """The checkpoint brings back the scheduler's base rates (and each group's rate) of the run that
    wrote it; this run's config decides them, so a resume with another ``optim.lr`` trains at it."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = list(base_lrs)
    for group, base, factor in zip(engine.optimizer.param_groups, base_lrs,
                                   (f(scheduler.last_epoch) for f in scheduler.lr_lambdas), strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor
