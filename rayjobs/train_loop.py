"""The Ray Train worker loop: a DeepSpeed engine trained on a streamed Ray Data shard.

Every worker runs ``train_loop_per_worker(config)``; everything it needs comes in ``config``
(built by ``rayjobs.distill.build_loop_config``), never from module globals. Batches stream from
``ray.train.get_dataset_shard("train")`` straight into the worker and are collated in Ray Data's
prefetch threads; the driver never touches them.

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

Test hook: when the driver's environment has ``RAYSTILL_TEST_CRASH_AT_STEP=N``, rank 0 kills
its own process (``os._exit(1)``) right after optimizer step N, once per run: a marker file next
to the checkpoints makes the restarted attempt carry on. Tests use it to exercise
``FailureConfig``; it has no effect when the variable is unset.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from cluster.storage import filesystem, is_s3, join, localize
from rayjobs.collate import CollateSettings, collate, model_inputs
from rayjobs.deepspeed_config import build_deepspeed_config
from rayjobs.distill_config import DistillationConfig
from rayjobs.losses import LossSettings, TopKTeacher, distill_loss
from rayjobs.schedule import make_lr_lambda, param_groups

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"
COMMIT_FILE = "COMMITTED"


@dataclass
class TrainerState:
    """What rank 0 writes beside the DeepSpeed shards; every rank reads it back on resume."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens: int = 0
    attempt: int = 0
    restored_from: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, directory: str) -> TrainerState:
        with open(os.path.join(directory, STATE_FILE)) as f:
            return cls(**json.load(f))


class RayCollate(NumpyBatchCollateFn):
    """``rayjobs.collate.collate`` as Ray Data wants it: run in the iterator's prefetch threads."""

    def __init__(self, settings: CollateSettings):
        super().__init__()
        self.settings = settings

    def __call__(self, batch):
        return collate(batch, self.settings)


def build_model(student_dir: str, cfg: DistillationConfig, seed: int):
    """Student with gradient checkpointing and LoRA as configured, on CPU in fp32.

    Seeded so every rank builds identical LoRA adapters: under ZeRO-3 each rank keeps its own
    slice of its own copy, and different inits would stitch together a model nobody built.
    """
    from rayjobs.lora import apply_lora, load_student

    torch.manual_seed(seed)
    model = load_student(student_dir)
    model.config.use_cache = False
    if cfg.optim.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model


def build_optimizer(model, cfg: DistillationConfig, num_layers: int) -> torch.optim.Optimizer:
    groups = param_groups(model.named_parameters(), cfg.optim.lr, cfg.optim.weight_decay, num_layers,
                          cfg.optim.layerwise_lr_decay)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def count_layers(model) -> int:
    """Transformer blocks of the (possibly peft-wrapped) model, for layer-wise LR decay."""
    config = getattr(model, "config", None) or model.get_base_model().config
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def _teacher(batch: dict, device) -> TopKTeacher | None:
    if "teacher_ids" not in batch:
        return None
    return TopKTeacher(batch["teacher_ids"].to(device), batch["teacher_logprobs"].to(device),
                       batch["teacher_mask"].to(device))


def _forward_loss(engine, batch: dict, settings: LossSettings):
    device = engine.device
    inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
    logits = engine(**inputs, use_cache=False).logits
    return distill_loss(logits, batch["labels"].to(device), _teacher(batch, device), settings)


def _all_reduce_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _gathered_state_dict(engine, zero_stage: int, rank: int) -> dict | None:
    """The full trained weights on rank 0 (a collective under ZeRO-3: every rank must call)."""
    if zero_stage == 3:
        # Gathers one module at a time onto rank 0; the name says 16-bit but it keeps the dtype.
        return engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return None
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def publish_merged(state_dict: dict, student_dir: str, cfg: DistillationConfig, location: str) -> None:
    """Rank 0: merge LoRA (if any) into the base and write the HF directory to ``location``."""
    from rayjobs.lora import export_student

    lora = cfg.lora if cfg.lora.enabled else None
    if not is_s3(location):
        export_student(student_dir, state_dict, lora, location)
        return
    from pyarrow import fs as pafs

    with tempfile.TemporaryDirectory() as tmp:
        local = export_student(student_dir, state_dict, lora, os.path.join(tmp, "merged"))
        dest_fs, dest = filesystem(location)
        dest_fs.delete_dir_contents(dest, missing_dir_ok=True)
        pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest_fs)


def _crash_hook(config: dict, step: int, rank: int) -> None:
    """Test-only fault injection; see the module docstring."""
    crash_at, marker = config.get("crash_at_step"), config.get("crash_marker")
    if rank != 0 or crash_at is None or step != crash_at or not marker:
        return
    fs, path = filesystem(marker)
    if fs.get_file_info(path).type.name != "NotFound":
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(f"crashed at step {step}\n".encode())
    print(f"[raystill test hook] rank 0 exits at step {step}", flush=True)
    os._exit(1)


class _Checkpointer:
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
            fs, path = filesystem(join(self.run_dir, name, COMMIT_FILE))
            with fs.open_output_stream(path) as f:
                f.write(json.dumps({"step": self.state.step}).encode())


def _checkpoint_step(checkpoint) -> int:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
        return int(json.loads(f.read().decode())["step"])


def find_checkpoint(run_dir: str):
    """The newest checkpoint: Ray Train's registered one, or a newer committed one in ``run_dir``.

    The Train controller registers a reported checkpoint when it next polls the worker (every
    ~2 s); a worker that dies in between leaves a complete checkpoint the controller never saw,
    and resuming from the one before would repeat a whole interval. The commit file, written
    after every rank uploaded, marks such checkpoints as safe to resume from.
    """
    import ray.train
    from pyarrow import fs as pafs

    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        candidates.append((_checkpoint_step(registered), 1, registered))
    fs, root = filesystem(run_dir)
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{COMMIT_FILE}") as f:
                step = int(json.loads(f.read().decode())["step"])
        except (FileNotFoundError, OSError, ValueError, KeyError):
            continue
        candidates.append((step, 0, ray.train.Checkpoint(info.path, filesystem=fs)))
    return max(candidates, key=lambda c: c[:2])[2] if candidates else None


def _restore(engine, state: TrainerState, run_dir: str) -> TrainerState:
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        return state
    with checkpoint.as_directory() as d:
        engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        restored = TrainerState.load(d)
    if restored.step != engine.global_steps:
        raise RuntimeError(f"checkpoint state step {restored.step} != DeepSpeed step {engine.global_steps}")
    restored.attempt += 1
    restored.restored_from.append(restored.step)
    return restored


def _val_metrics(engine, settings: LossSettings, collate_fn, batch_size: int, world: int) -> dict:
    """Token-weighted validation loss over every rank's ``val`` shard."""
    import ray.train

    shard = ray.train.get_dataset_shard("val")
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # total*n, ce*n, kd*n_kd, n, n_kd
    engine.eval()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate_fn):
            out = _forward_loss(engine, batch, settings)
            n, n_kd = float(out.num_tokens), float(out.num_kd_tokens)
            sums = [sums[0] + float(out.total) * n, sums[1] + float(out.ce) * n,
                    sums[2] + float(out.kd) * n_kd, sums[3] + n, sums[4] + n_kd]
    engine.train()
    total, ce, kd, n, n_kd = _all_reduce_sum(sums, world)
    if n == 0:
        return {}
    return {"val_loss": total / n, "val_ce": ce / n, "val_kd": kd / n_kd if n_kd else 0.0,
            "val_perplexity": math.exp(min(ce / n, 50.0)), "val_tokens": int(n)}


def _build_engine(cfg: DistillationConfig, student_dir: str, total_steps: int, world: int):
    """``(engine, lr_lambda)``: the student, our AdamW groups and LR schedule under DeepSpeed."""
    import deepspeed

    model = build_model(student_dir, cfg, cfg.seed)
    optimizer = build_optimizer(model, cfg, count_layers(model))
    lr_lambda = make_lr_lambda(cfg.optim.schedule, total_steps, cfg.optim.warmup_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
        config=build_deepspeed_config(cfg, world),
    )
    return engine, lr_lambda


class _StepMeter:
    """Sums one optimizer step's micro-batch losses as tensors (no device sync per micro-batch)."""

    def __init__(self):
        self.losses = torch.zeros(3, dtype=torch.float64)
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, out, num_tokens: int) -> None:
        self.losses += torch.stack([out.total.detach(), out.ce.detach(), out.kd.detach()]).double().cpu()
        self.tokens += num_tokens

    def row(self, state: TrainerState, lr: float, world: int, micro_per_step: int) -> dict:
        loss, ce, kd, tokens = _all_reduce_sum([*self.losses.tolist(), float(self.tokens)], world)
        n = micro_per_step * world
        elapsed = time.perf_counter() - self.start
        return {"step": state.step, "epoch": state.epoch, "attempt": state.attempt,
                "loss": loss / n, "ce": ce / n, "kd": kd / n, "lr": lr,
                "tokens": int(tokens), "step_time_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0}


@dataclass
class _Worker:
    """One rank's training: built by ``train_loop_per_worker``, then ``train()`` and ``finish()``."""

    config: dict
    cfg: DistillationConfig
    rank: int
    world: int
    student_dir: str
    engine: object
    lr_lambda: object
    state: TrainerState
    settings: LossSettings
    collate_fn: RayCollate

    def __post_init__(self):
        self.checkpointer = _Checkpointer(self.engine, self.state, self.rank, self.world, self.config["run_dir"])

    def train(self, shard, total_steps: int) -> None:
        cfg, state, engine = self.cfg, self.state, self.engine
        ga = cfg.optim.grad_accum
        micro = 0
        meter = _StepMeter()
        engine.train()
        while state.step < total_steps:
            seen = 0
            for batch in shard.iter_torch_batches(
                batch_size=cfg.optim.micro_batch_size,
                collate_fn=self.collate_fn,
                local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                local_shuffle_seed=cfg.seed + state.epoch if cfg.shuffle_buffer else None,
                prefetch_batches=2,
            ):
                seen += 1
                if seen <= state.batches_in_epoch:
                    continue  # replaying the stream up to the checkpoint (see "resume")
                out = _forward_loss(engine, batch, self.settings)
                engine.backward(out.total)
                engine.step()  # DeepSpeed steps the optimizer and LR schedule every ga-th call
                state.batches_in_epoch += 1
                micro += 1
                meter.add(out, int(batch["num_tokens"]))
                if micro % ga:
                    continue
                state.step = engine.global_steps
                row = meter.row(state, cfg.optim.lr * self.lr_lambda(state.step - 1), self.world, ga)
                state.tokens += row["tokens"]
                if self.rank == 0:
                    state.history.append(row)
                if state.step % cfg.checkpoint_every == 0 and state.step < total_steps:
                    self.checkpointer.save({"step": state.step, "loss": row["loss"]}, f"step_{state.step:08d}")
                _crash_hook(self.config, state.step, self.rank)
                meter = _StepMeter()  # checkpoint time stays out of the next step's time
                if state.step >= total_steps:
                    break
            else:
                if seen == 0:
                    raise RuntimeError("the train split is empty for this worker")
                state.epoch += 1
                state.batches_in_epoch = 0

    def finish(self) -> None:
        """Validation loss, the merged export (rank 0) and the final checkpoint with the metrics."""
        state = self.state
        metrics = {"step": state.step, "epoch": state.epoch, "tokens": state.tokens, "attempt": state.attempt}
        if state.history:
            metrics.update({k: state.history[-1][k] for k in ("loss", "ce", "kd")})
        if self.config["has_val"]:
            metrics.update(_val_metrics(self.engine, self.settings, self.collate_fn, self.cfg.optim.micro_batch_size,
                                        self.world))
        weights = _gathered_state_dict(self.engine, self.cfg.deepspeed.zero_stage, self.rank)
        if self.rank == 0:
            publish_merged(weights, self.student_dir, self.cfg, self.config["merged_location"])
            metrics["merged"] = self.config["merged_location"]
        state.final = metrics
        self.checkpointer.save(metrics, f"final_{state.step:08d}_a{state.attempt}")


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from transformers import AutoTokenizer

    cfg = DistillationConfig.model_validate(config["distillation"])
    ctx = ray.train.get_context()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    total_steps = int(config["total_steps"])
    settings = LossSettings(**cfg.loss.model_dump())
    student_dir = localize(config["student"])
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine, lr_lambda = _build_engine(cfg, student_dir, total_steps, ctx.get_world_size())
    worker = _Worker(
        config=config, cfg=cfg, rank=ctx.get_world_rank(), world=ctx.get_world_size(), student_dir=student_dir,
        engine=engine, lr_lambda=lr_lambda, state=_restore(engine, TrainerState(), config["run_dir"]),
        settings=settings,
        collate_fn=RayCollate(CollateSettings(pad_id=pad_id, max_seq_len=cfg.max_seq_len, packing=cfg.optim.packing,
                                              with_teacher=settings.kind == "logit")),
    )
    worker.train(ray.train.get_dataset_shard("train"), total_steps)
    worker.finish()
