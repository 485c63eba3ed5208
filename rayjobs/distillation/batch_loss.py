"""What one micro-batch costs: the student's forward and the configured loss at a given step.

The teacher signal comes from one of three places, fixed per run:

* none (``loss.kind: data``): cross-entropy on the teacher's text.
* stored top-k (``kind: logit``, ``teacher.source: stored``): the collated ``TopKTeacher``, aligned
  by offset (same tokenizer) or by the generation stage's cross-tokenizer alignment;
  ``loss.xtok.method: uld`` replaces the divergence with ULD's sorted-probability distance.
* the scoring service (``kind: logit``, ``teacher.source: service``): the same ``TopKTeacher``, its
  columns filled per batch by the teacher service (``rayjobs.distillation.service_teacher``).
* the online teacher (``kind: feature``, or ``logit`` with ``source: online``): the frozen teacher
  runs on the batch (``rayjobs.distillation.online_teacher``); ``feature`` adds the hidden-state and attention
  losses through the projections (``rayjobs.distillation.feature_losses``).

Schedules are pure functions of the optimizer step (``rayjobs.distillation.schedule``): the KD temperature
ramps from ``schedule.temperature_start`` to ``temperature_end`` over the run or follows explicit
``schedule.temperatures`` phases, feature runs train the hidden-state loss alone for the first
``schedule.stage1_steps`` steps, layer pairs join by ``feature.progressive``, and the feature
noise's sigma ramps (training only: validation runs it at 0). With an online teacher,
``loss.contrastive`` adds the pooled InfoNCE term (``rayjobs.distillation.contrastive``) in stage 2.

The student runs without its LM head (``logits_to_keep`` empty); its last hidden states go to
the chunked head (``rayjobs.distillation.chunked_head.call_head``), which computes CE and KD
``loss.chunk_tokens`` positions at a time, so no ``[tokens x V]`` logits exist for the student
or the online teacher.

``build`` wires it for a worker: the collate function (with the teacher -> student vocabulary map,
loaded once here, when stored or service top-k cross tokenizers), the projections (to be trained
with the student) and the loss callable; it imports no engine itself, the teacher is loaded by the caller
once the DeepSpeed engine knows its device (``attach_teacher``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch

from datasets_pipeline.targets import same_vocabulary
from datasets_pipeline.vocab_cache import cached_vocab_map
from rayjobs.distillation.chunked_head import call_head, no_logits, output_head
from rayjobs.distillation.collate import CollateSettings, collate, model_inputs, pad_id
from rayjobs.distillation.config import DistillationConfig
from rayjobs.distillation.contrastive import ContrastiveHead, WithContrastive, contrastive_loss
from rayjobs.distillation.feature_losses import (
    FeatureProjector,
    FeatureSettings,
    check_layer_map,
    feature_distill_loss,
    uniform_layer_map,
)
from rayjobs.distillation.losses import LossSettings, TopKTeacher, divergence_term
from rayjobs.distillation.on_policy import OnPolicyCollate
from rayjobs.distillation.online_teacher import OnlineCollate, OnlineTeacher, TeacherTokens, load_teacher
from rayjobs.distillation.schedule import layer_start_steps, linear_ramp, loss_stage, phase_temperature, temperature_at
from rayjobs.distillation.service_teacher import ServiceCollate, ServiceTopK, client_for
from rayjobs.distillation.xtok import uld_term

BASE_TERMS = ("loss", "ce", "kd")
FEATURE_TERMS = ("hidden", "attention")


def _stored_teacher(batch: dict, device) -> TopKTeacher | None:
    if "teacher_ids" not in batch:
        return None
    return TopKTeacher(batch["teacher_ids"].to(device), batch["teacher_logprobs"].to(device),
                       batch["teacher_mask"].to(device))


@dataclass
class BatchLoss:
    """``loss(engine, batch, step)`` -> ``LossOutput`` or ``FeatureLossOutput`` for update ``step + 1``."""

    cfg: DistillationConfig
    total_steps: int
    feature: FeatureSettings | None = None
    teacher: OnlineTeacher | None = None
    steps_per_epoch: float = 0.0  # for schedule.temperatures phases that end in epochs

    @property
    def terms(self) -> tuple[str, ...]:
        """Curve columns: ``loss`` is the output's ``total``."""
        contrastive = ("contrastive",) if self.cfg.loss.contrastive.weight else ()
        return BASE_TERMS + (FEATURE_TERMS if self.feature else ()) + contrastive

    def settings_at(self, step: int, on_policy: bool = False) -> LossSettings:
        """The loss in force for update ``step + 1``; on-policy batches take ``on_policy``'s divergence and alpha."""
        loss, sched = self.cfg.loss, self.cfg.loss.schedule
        kind = "data" if loss.kind == "data" else "logit"
        settings = LossSettings(kind=kind, **loss.settings_fields())
        if on_policy:
            op = self.cfg.on_policy
            settings = dataclasses.replace(settings, divergence=op.divergence, alpha=op.alpha)
        if sched.temperatures is not None:
            return dataclasses.replace(settings, temperature=phase_temperature(step, sched.temperatures,
                                                                               self.steps_per_epoch))
        if sched.temperature_start is None:
            return settings
        t = temperature_at(step, self.total_steps, sched.temperature_start, sched.temperature_end)
        return dataclasses.replace(settings, temperature=t)

    def noise_sigma(self, step: int) -> float:
        """Feature noise for update ``step + 1`` (0 without ``feature.noise``)."""
        noise = self.cfg.loss.feature.noise
        if noise is None:
            return 0.0
        end = noise.sigma if noise.sigma_end is None else noise.sigma_end
        return linear_ramp(step, self.total_steps, noise.sigma, end)

    def schedule_row(self, step: int) -> dict:
        """Curve columns of the schedules in force for update ``step + 1`` (empty when none is set)."""
        row, sched = {}, self.cfg.loss.schedule
        if sched.temperature_start is not None or sched.temperatures is not None:
            row["temperature"] = self.settings_at(step).temperature
        if self.feature is not None and sched.stage1_steps:
            row["stage"] = loss_stage(step, sched.stage1_steps)
        if self.feature is not None and self.feature.start_steps is not None:
            row["layer_pairs"] = sum(self.feature.active(step))
        if self.feature is not None and self.cfg.loss.feature.noise is not None:
            row["feature_sigma"] = self.noise_sigma(step)
        return row

    def __call__(self, engine, batch: dict, step: int, on_policy: bool = False):
        device = engine.device
        settings = self.settings_at(step, on_policy)
        labels = batch["labels"].to(device)
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        with_attention = bool(self.feature and self.feature.attention_weight > 0)
        student = engine(**inputs, use_cache=False, output_hidden_states=True, output_attentions=with_attention,
                         logits_to_keep=no_logits(device))
        head, hidden = output_head(engine.module), student.hidden_states[-1]
        chunk, uld = self.cfg.loss.chunk_tokens, self.cfg.loss.xtok.method == "uld"
        if not self.cfg.online_teacher:
            kd_term = uld_term if uld else divergence_term
            return call_head(head, hidden, labels, _stored_teacher(batch, device), settings, chunk, kd_term)
        teacher_out = self.teacher.run(batch, device)
        align = batch["align_index"].to(device)
        uld = uld and not self.teacher.same_vocab
        kd_term = uld_term if uld else divergence_term
        stage = loss_stage(step, self.cfg.loss.schedule.stage1_steps) if self.feature else 2
        # Stage 1 trains the hidden-state loss alone: CE is only reported, so no gradients are made.
        with self.teacher.head() as t_head, torch.set_grad_enabled(torch.is_grad_enabled() and stage == 2):
            logit_teacher = self.teacher.logit_teacher(teacher_out, align, head.out_features, t_head, chunk, raw=uld)
            logit = call_head(head, hidden, labels, logit_teacher, settings, chunk, kd_term)
        out = logit
        if self.feature is not None:
            sigma = self.noise_sigma(step) if engine.training else 0.0
            out = feature_distill_loss(student, teacher_out, align, logit, engine.module.projector, self.feature,
                                       stage, step, sigma)
        return self._with_contrastive(out, engine.module, student, teacher_out, align, stage)

    def _with_contrastive(self, out, module, student, teacher_out, align, stage: int):
        """``out`` plus the weighted contrastive term (stage 2 only; reported as 0 in stage 1)."""
        c = self.cfg.loss.contrastive
        if not c.weight:
            return out
        if stage == 1:
            return WithContrastive(out, out.total, out.total.new_zeros(()))
        term = contrastive_loss(student.hidden_states[c.student_layer], teacher_out.hidden_states[c.teacher_layer],
                                align, module.contrastive, c.temperature)
        return WithContrastive(out, out.total + c.weight * term, term)


def feature_settings(cfg: DistillationConfig, s_layers: int, t_layers: int) -> FeatureSettings:
    """Layer pairs from config (validated against both depths) or the uniform default."""
    f = cfg.loss.feature
    if f.layer_map is None:
        pairs = uniform_layer_map(s_layers, t_layers)
    else:
        try:
            pairs = check_layer_map(f.layer_map, s_layers, t_layers)
        except ValueError as e:
            raise ValueError(f"distillation.loss.feature.layer_map: {e}") from None
    starts = None
    if f.progressive is not None and f.progressive.every is not None:
        starts = layer_start_steps([s for s, _ in pairs], f.progressive.every)
    elif f.progressive is not None:
        if len(f.progressive.start_steps) != len(pairs):
            raise ValueError(f"distillation.loss.feature.progressive.start_steps: {len(f.progressive.start_steps)} "
                             f"entries for {len(pairs)} layer pairs")
        starts = tuple(f.progressive.start_steps)
    return FeatureSettings(tuple(pairs), f.hidden_loss, f.hidden_weight, f.attention_weight, starts)


@dataclass
class WorkerLoss:
    """What ``build`` hands the train loop."""

    loss: BatchLoss
    collate: object
    projector: FeatureProjector | None
    teacher_dir: str | None
    service: ServiceTopK | None = None
    contrastive: ContrastiveHead | None = None

    @property
    def trained_heads(self) -> bool:
        """Whether the engine trains ``DistillModule`` (student + projections) rather than the student."""
        return self.projector is not None or self.contrastive is not None

    def progress(self) -> dict:
        """Curve columns of the teacher service (cumulative per worker); empty for other teachers."""
        if self.service is None:
            return {}
        return {"teacher_scored_tokens": self.service.scored_tokens, "teacher_retries": self.service.client.retried}

    @property
    def eager_attention(self) -> bool:
        return bool(self.loss.feature and self.loss.feature.attention_weight > 0)

    def attach_teacher(self, student_tok, teacher_tok, device) -> None:
        """Load the frozen teacher onto the engine's device (online runs only)."""
        cfg = self.loss.cfg
        model = load_teacher(self.teacher_dir, cfg.teacher, self.eager_attention, device)
        self.loss.teacher = OnlineTeacher(model, student_tok, teacher_tok, cfg.loss.xtok.online_topk,
                                          with_attention=self.eager_attention)


def collate_vocab_map(method: str, teacher_tok, student_tok) -> np.ndarray | None:
    """The teacher -> student id map the collate applies to cross-tokenizer top-k rows, or None.

    None when there is no teacher tokenizer (same-tokenizer shards), the method (``loss.xtok.method``)
    is ULD (it uses the teacher's own ids) or the two vocabularies are equal. From ``vocab_cache``: built once per
    tokenizer pair and node, then a ~0.5 MB ``.npy`` read.
    """
    if teacher_tok is None or method != "vocab_map":
        return None
    return None if same_vocabulary(teacher_tok, student_tok) else cached_vocab_map(teacher_tok, student_tok)


def build(cfg: DistillationConfig, total_steps: int, student_tok, student_config, max_seq_len: int,
          teacher_dir: str | None, teacher_tok=None,
          steps_per_epoch: float = 0.0) -> WorkerLoss:
    """Collate, projections and loss for this run's configuration (see the module docstring).

    ``teacher_tok``: the online or service teacher's tokenizer, or for stored top-k the tokenizer
    the shards' teacher ids belong to (cross-tokenizer shards only).
    """
    stored_kd = cfg.loss.kind == "logit" and not cfg.online_teacher
    settings = CollateSettings(pad_id=pad_id(student_tok), max_seq_len=max_seq_len, packing=cfg.optim.packing,
                               with_teacher=stored_kd, xtok_map=cfg.loss.xtok.method == "vocab_map",
                               vocab_map=collate_vocab_map(cfg.loss.xtok.method, teacher_tok, student_tok) if stored_kd else None)
    loss = BatchLoss(cfg, total_steps, steps_per_epoch=steps_per_epoch)
    if cfg.service_teacher:
        ref = cfg.teacher.service
        topk = ServiceTopK(client_for(ref), teacher_tok, ref.top_k)
        scored = ServiceCollate(settings, topk)
        if cfg.on_policy.enabled:  # chosen batches leave the collate unscored (rayjobs.distillation.on_policy)
            return WorkerLoss(loss, OnPolicyCollate(scored, cfg.on_policy.fraction, cfg.seed), None, None, topk)
        return WorkerLoss(loss, scored, None, None, topk)
    if not cfg.online_teacher:
        return WorkerLoss(loss, functools.partial(collate, settings=settings), None, None)
    from transformers import AutoConfig

    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    tokens = TeacherTokens(student_tok, teacher_tok, teacher_config.max_position_embeddings)
    projector = contrastive = None
    torch.manual_seed(cfg.seed)  # every rank builds the same projections
    if cfg.loss.kind == "feature":
        loss.feature = feature_settings(cfg, student_config.num_hidden_layers, teacher_config.num_hidden_layers)
        projector = FeatureProjector(student_config.hidden_size, teacher_config.hidden_size, len(loss.feature.pairs))
    if cfg.loss.contrastive.weight:
        contrastive = ContrastiveHead(student_config.hidden_size, teacher_config.hidden_size)
    return WorkerLoss(loss, OnlineCollate(settings, tokens, pad_id(teacher_tok)), projector, teacher_dir,
                      contrastive=contrastive)
