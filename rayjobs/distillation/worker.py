"""The Ray Train worker loop: a DeepSpeed engine trained on a streamed Ray Data shard.

Every worker runs ``train_loop_per_worker(config)``; everything it needs comes in ``config``
(built by ``rayjobs.distill.build_loop_config``), never from module globals. Batches stream from
``ray.train.get_dataset_shard("train")`` straight into the worker and are collated in Ray Data's
prefetch threads; the driver never touches them. What a micro-batch costs (stored or online
teacher, feature losses, schedules) is ``rayjobs.distillation.batch_loss``; checkpoints and what "resume"
means are ``rayjobs.distillation.checkpoints``.

Test hook: when the driver's environment has ``RAYSTILL_TEST_CRASH_AT_STEP=N``, rank 0 kills
its own process (``os._exit(1)``) right after optimizer step N, once per run: a marker file next
to the checkpoints makes the restarted attempt carry on. Tests use it to exercise
``FailureConfig``; it has no effect when the variable is unset.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from cluster.storage import filesystem, is_s3, join, localize, read_bytes, write_bytes
from rayjobs.distillation import batch_loss, early_stopping
from rayjobs.distillation.deepspeed_config import build_deepspeed_config
from rayjobs.distillation.config import DistillationConfig
from rayjobs.distillation.feature_losses import DistillModule
from rayjobs.distillation.optimizers import make_optimizer
from rayjobs.distillation.regularize import add_hidden_dropout, attention_dropout_kwargs
from rayjobs.distillation.schedule import make_lr_lambda, param_groups
from rayjobs.distillation.checkpoints import Checkpointer, TrainerState, restore
from rayjobs.distillation.validation import EmSample, all_reduce_sum, generation_model, val_loss_metrics
from rayjobs.distillation.on_policy import OnPolicyRows


class RayCollate(NumpyBatchCollateFn):
    """A collate callable (``rayjobs.distillation.batch_loss.build``) as Ray Data wants it: run in prefetch threads."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __call__(self, batch):
        return self.fn(batch)


def build_model(student_dir: str, cfg: DistillationConfig, seed: int, eager_attention: bool = False):
    """Student with gradient checkpointing, training dropout and LoRA as configured, on CPU in fp32.

    Seeded so every rank builds identical LoRA adapters: under ZeRO-3 each rank keeps its own
    slice of its own copy, and different inits would stitch together a model nobody built.
    ``eager_attention``: attention probabilities are returned only by the eager implementation.
    """
    from transformers import AutoConfig

    from rayjobs.distillation.lora import apply_lora, load_student

    torch.manual_seed(seed)
    dropout = attention_dropout_kwargs(AutoConfig.from_pretrained(student_dir), cfg.dropout.attention)
    model = load_student(student_dir, attn_implementation="eager" if eager_attention else None, **dropout)
    if cfg.dropout.hidden:
        add_hidden_dropout(model, cfg.dropout.hidden)
    model.config.use_cache = False
    if cfg.optim.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model


def build_optimizer(model, cfg: DistillationConfig, num_layers: int) -> torch.optim.Optimizer:
    groups = param_groups(model.named_parameters(), cfg.optim.lr, cfg.optim.weight_decay, num_layers,
                          cfg.optim.layerwise_lr_decay)
    return make_optimizer(groups, cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay)


def count_layers(model) -> int:
    """Transformer blocks of the (possibly peft-wrapped) model, for layer-wise LR decay."""
    config = getattr(model, "config", None) or model.get_base_model().config
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def _gathered_state_dict(engine, zero_stage: int, rank: int) -> dict | None:
    """The full trained student weights on rank 0 (a collective under ZeRO-3: every rank must call).

    Feature and contrastive runs train ``DistillModule`` (student + projections): only the student's keys return.
    """
    if zero_stage == 3:
        # Gathers one module at a time onto rank 0; the name says 16-bit but it keeps the dtype.
        state = engine._zero3_consolidated_16bit_state_dict()
    elif rank == 0:
        state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    else:
        return None
    if state is not None and isinstance(engine.module, DistillModule):
        state = DistillModule.student_state_dict(state)
    return state


def publish_merged(state_dict: dict, student_dir: str, cfg: DistillationConfig, location: str) -> None:
    """Rank 0: merge LoRA (if any) into the base and write the HF directory to ``location``."""
    from rayjobs.distillation.lora import export_student

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
    if read_bytes(marker) is not None:
        return
    write_bytes(marker, f"crashed at step {step}\n".encode())
    print(f"[raystill test hook] rank 0 exits at step {step}", flush=True)
    os._exit(1)


def _build_engine(cfg: DistillationConfig, student_dir: str, total_steps: int, world: int,
                  parts: batch_loss.WorkerLoss):
    """``(engine, lr_lambda)``: the student (with the feature / contrastive projections, if any), our
    optimizer's param groups and LR schedule under DeepSpeed."""
    import deepspeed

    model = build_model(student_dir, cfg, cfg.seed, parts.eager_attention)
    num_layers = count_layers(model)
    if parts.trained_heads:
        model = DistillModule(model, parts.projector, parts.contrastive)
    optimizer = build_optimizer(model, cfg, num_layers)
    lr_lambda = make_lr_lambda(cfg.optim.schedule, total_steps, 0.0, warmup=cfg.optim.warmup(total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
        config=build_deepspeed_config(cfg, world),
    )
    return engine, lr_lambda


def _peak_memory_mib() -> float:
    """This worker's peak memory so far: allocated accelerator memory on GPU, peak RSS on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _StepMeter:
    """Sums one optimizer step's micro-batch loss terms as tensors (no device sync per micro-batch)."""

    def __init__(self, terms: tuple[str, ...]):
        self.terms = terms
        self.losses = torch.zeros(len(terms), dtype=torch.float64)
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, out, num_tokens: int) -> None:
        values = [out.total if t == "loss" else getattr(out, t) for t in self.terms]
        self.losses += torch.stack([v.detach() for v in values]).double().cpu()
        self.tokens += num_tokens

    def row(self, state: TrainerState, lr: float, world: int, micro_per_step: int) -> dict:
        *losses, tokens = all_reduce_sum([*self.losses.tolist(), float(self.tokens)], world)
        n = micro_per_step * world
        elapsed = time.perf_counter() - self.start
        return {"step": state.step, "epoch": state.epoch, "attempt": state.attempt,
                **{t: v / n for t, v in zip(self.terms, losses, strict=True)}, "lr": lr,
                "tokens": int(tokens), "step_time_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0,
                "peak_mem_mib": _peak_memory_mib()}


def _progress(row: dict, total_steps: int) -> None:
    """About twenty lines per run on the driver's console (Ray forwards worker stdout)."""
    step = row["step"]
    if step == 1 or step == total_steps or step % max(1, total_steps // 20) == 0:
        on_policy = (f"; on-policy: {row['on_policy_batches']} batches, sampled {row['sampled_tokens_per_s']:.0f} "
                     f"tokens/s, scored {row['scored_tokens_per_s']:.0f} tokens/s, policy lag {row['policy_lag']}"
                     if "policy_lag" in row else "")
        print(f"distill: step {step}/{total_steps} epoch {row['epoch']} loss {row['loss']:.4f} "
              f"lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tokens/s{on_policy}", flush=True)


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
    loss: batch_loss.BatchLoss
    collate_fn: RayCollate
    progress: object  # () -> dict of teacher-side curve columns (batch_loss.WorkerLoss.progress)
    tokenizer: object
    em_sample: EmSample | None = None
    val_collate: RayCollate | None = None  # on-policy runs validate on the stored samples (off-policy collate)
    sampler: object = None  # on-policy runs: rayjobs.distillation.sampler.SamplerLink

    def __post_init__(self):
        self.checkpointer = Checkpointer(self.engine, self.state, self.rank, self.world, self.config["run_dir"])
        self.val_collate = self.val_collate or self.collate_fn

    def refresh_sampler(self) -> dict:
        """Push the current weights to the on-policy sampler (every rank: a collective under ZeRO-3)."""
        timings = self.sampler.refresh(
            self.state.step, lambda: _gathered_state_dict(self.engine, self.cfg.deepspeed.zero_stage, self.rank),
            lambda weights, location: publish_merged(weights, self.student_dir, self.cfg, location),
            join(self.config["run_dir"], "sampler_weights"), self.rank, self.world)
        self.state.sampler_step = self.state.step
        return timings

    def _on_policy_row(self, total_steps: int) -> dict:
        """This step's rollout columns, and the sampler refresh when one is due."""
        row = self.sampler.step_row()
        self.state.on_policy_batches += row["on_policy_batches"]
        step = self.state.step
        if step % self.cfg.on_policy.sync_every == 0 and step < total_steps:
            row.update(self.refresh_sampler())
        return row

    def evaluate(self) -> dict:
        """Validation loss terms (and exact match on the EM sample) now; every rank gets the same numbers."""
        metrics = val_loss_metrics(self.engine, self.loss, self.val_collate, self.cfg.optim.micro_batch_size,
                                   self.world, max(self.state.step - 1, 0))
        if self.em_sample is not None:
            metrics.update(self.em_sample.metrics(generation_model(self.engine), self.tokenizer, self.rank,
                                                  self.world))
        return metrics

    def export(self) -> str:
        """The merged student as it is now, at this training's candidate location (collective under ZeRO-3)."""
        location = self.config["merged_location"]
        weights = _gathered_state_dict(self.engine, self.cfg.deepspeed.zero_stage, self.rank)
        if self.rank == 0:
            publish_merged(weights, self.student_dir, self.cfg, location)
        return location

    def watch(self, metrics: dict) -> None:
        """Early stopping's bookkeeping after an evaluation at the current step: export an improvement,
        mark the run stopped after ``patience`` evaluations without one."""
        state, rule = self.state, self.cfg.early_stopping
        if rule is None or early_stopping.evaluated_at(state.best, state.step):
            return
        state.best, improved = early_stopping.record_eval(state.best, state.step, metrics, rule)
        if improved:
            state.best["location"] = self.export()
        if early_stopping.should_stop(state.best, rule) and state.stopped_at is None:
            state.stopped_at = state.step
            if self.rank == 0:
                print(f"distill: early stopping at step {state.step}: {rule.metric} did not improve by more than "
                      f"{rule.min_delta} in {rule.patience} evaluations; best step {state.best.get('step')} "
                      f"({rule.metric} {state.best.get('value')})", flush=True)

    def periodic_eval(self, row: dict) -> None:
        """``eval_every``: evaluate, add the metrics to this step's curve row, feed early stopping."""
        every = self.cfg.eval_every
        if not every or self.state.step % every or not self.config["has_val"]:
            return
        metrics = self.evaluate()
        row.update(metrics)
        self.watch(metrics)
        if self.rank == 0:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"distill: eval at step {self.state.step}: {shown}", flush=True)

    def train(self, shard, total_steps: int) -> None:
        cfg, state, engine = self.cfg, self.state, self.engine
        ga = cfg.optim.grad_accum
        micro = 0
        meter = _StepMeter(self.loss.terms)
        engine.train()
        if self.sampler is not None and 0 < state.step < total_steps:
            # A resume: the sampler holds the first weights (a new driver) or a failed attempt's later ones.
            print(f"distill: on-policy sampler refreshed from the restored step {state.step}: {self.refresh_sampler()}",
                  flush=True)
        while state.step < total_steps and state.stopped_at is None:
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
                on_policy = isinstance(batch, OnPolicyRows)
                if on_policy:
                    batch = self.sampler.rollout(batch, state.step)
                out = self.loss(engine, batch, state.step, on_policy)
                engine.backward(out.total)
                engine.step()  # DeepSpeed steps the optimizer and LR schedule every ga-th call
                state.batches_in_epoch += 1
                micro += 1
                meter.add(out, int(batch["num_tokens"]))
                if micro % ga:
                    continue
                state.step = engine.global_steps
                # The scheduler's own base rate (not the config's): the log shows what the optimizer ran.
                base_lr = max(engine.lr_scheduler.base_lrs)
                row = meter.row(state, base_lr * self.lr_lambda(state.step - 1), self.world, ga)
                row.update(self.loss.schedule_row(state.step - 1))
                row.update(self.progress())
                if self.sampler is not None:
                    row.update(self._on_policy_row(total_steps))
                self.periodic_eval(row)
                state.tokens += row["tokens"]
                if self.rank == 0:
                    state.history.append(row)
                    _progress(row, total_steps)
                if state.step % cfg.checkpoint_every == 0 and state.step < total_steps:
                    self.checkpointer.save({"step": state.step, "loss": row["loss"]}, f"step_{state.step:08d}")
                _crash_hook(self.config, state.step, self.rank)
                meter = _StepMeter(self.loss.terms)  # checkpoint time stays out of the next step's time
                if state.step >= total_steps or state.stopped_at is not None:
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
            metrics.update({k: state.history[-1][k] for k in self.loss.terms})
        if self.config["has_val"]:
            metrics.update(self.evaluate())
        if self.cfg.early_stopping is None:
            metrics.update(merged=self.export(), merged_step=state.step)
        else:
            self.watch(metrics)  # the last step counts as an evaluation: it may be the best
            if "location" not in state.best:  # no evaluation had a finite metric: the last step ships
                state.best.update(location=self.export(), step=state.step)
            metrics.update(merged=state.best["location"], merged_step=state.best["step"],
                           early_stopping=early_stopping.summary(state.best, state.stopped_at,
                                                                 int(self.config["total_steps"])))
        state.final = metrics
        self.checkpointer.save(metrics, f"final_{state.step:08d}_a{state.attempt}")


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from transformers import AutoConfig, AutoTokenizer

    cfg = DistillationConfig.model_validate(config["distillation"])
    ctx = ray.train.get_context()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    total_steps = int(config["total_steps"])
    student_dir = localize(config["student"])
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    # Only the online teacher runs here; otherwise the worker needs just the teacher's tokenizer: the service
    # teacher's prompt rendering, and stored cross-tokenizer top-k's ids (the collate's vocabulary map).
    teacher_dir = (localize(config["teacher"], tokenizer_only=not cfg.online_teacher) if config["teacher"]
                   else None)
    teacher_tok = None
    if teacher_dir or config.get("teacher_tokenizer"):
        teacher_tok = AutoTokenizer.from_pretrained(teacher_dir or localize(config["teacher_tokenizer"],
                                                                            tokenizer_only=True))
    parts = batch_loss.build(cfg, total_steps, tokenizer, AutoConfig.from_pretrained(student_dir),
                             int(config["max_seq_len"]), teacher_dir if cfg.online_teacher else None, teacher_tok,
                             float(config.get("steps_per_epoch", 0.0)))
    engine, lr_lambda = _build_engine(cfg, student_dir, total_steps, ctx.get_world_size(), parts)
    if cfg.online_teacher:
        parts.attach_teacher(tokenizer, teacher_tok, engine.device)
    worker = _Worker(
        config=config, cfg=cfg, rank=ctx.get_world_rank(), world=ctx.get_world_size(), student_dir=student_dir,
        engine=engine, lr_lambda=lr_lambda, state=restore(engine, TrainerState(), config["run_dir"]),
        loss=parts.loss, collate_fn=RayCollate(parts.collate), progress=parts.progress, tokenizer=tokenizer,
        em_sample=EmSample(**config["em_sample"]) if config.get("em_sample") else None,
    )
    if cfg.on_policy.enabled:
        from rayjobs.distillation.on_policy import cross_view
        from rayjobs.distillation.sampler import SamplerLink

        scored = parts.collate.off_policy
        worker.val_collate = RayCollate(scored)
        worker.sampler = SamplerLink(config["sampler"], cfg.on_policy, scored, int(config["max_seq_len"]),
                                     cross_view(tokenizer, teacher_tok))
    worker.train(ray.train.get_dataset_shard("train"), total_steps)
    worker.finish()
