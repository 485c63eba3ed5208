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
ramps from ``schedule.temperature_start`` to ``temperature_end`` over the run, and feature runs
train the hidden-state loss alone for the first ``schedule.stage1_steps`` steps.

The student runs without its LM head (``logits_to_keep`` empty); its last hidden states go to
the chunked head (``rayjobs.distillation.chunked_head.call_head``), which computes CE and KD
``loss.chunk_tokens`` positions at a time, so no ``[tokens x V]`` logits exist for the student
or the online teacher.

``build`` wires it for a worker: the collate function, the projections (to be trained with the
student) and the loss callable; it imports no engine itself, the teacher is loaded by the caller
once the DeepSpeed engine knows its device (``attach_teacher``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from rayjobs.distillation.chunked_head import call_head, no_logits, output_head
from rayjobs.distillation.collate import CollateSettings, collate, model_inputs, pad_id
from rayjobs.distillation.config import DistillationConfig
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
from rayjobs.distillation.schedule import loss_stage, temperature_at
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

    @property
    def terms(self) -> tuple[str, ...]:
        """Curve columns: ``loss`` is the output's ``total``."""
        return BASE_TERMS + (FEATURE_TERMS if self.feature else ())

    def settings_at(self, step: int, on_policy: bool = False) -> LossSettings:
        """The loss in force for update ``step + 1``; on-policy batches take ``on_policy``'s divergence and alpha."""
        loss = self.cfg.loss
        kind = "data" if loss.kind == "data" else "logit"
        settings = LossSettings(kind=kind, **loss.settings_fields())
        if on_policy:
            op = self.cfg.on_policy
            settings = dataclasses.replace(settings, divergence=op.divergence, alpha=op.alpha)
        if loss.schedule.temperature_start is None:
            return settings
        t = temperature_at(step, self.total_steps, loss.schedule.temperature_start, loss.schedule.temperature_end)
        return dataclasses.replace(settings, temperature=t)

    def schedule_row(self, step: int) -> dict:
        """Curve columns of the schedules in force for update ``step + 1`` (empty when none is set)."""
        row = {}
        if self.cfg.loss.schedule.temperature_start is not None:
            row["temperature"] = self.settings_at(step).temperature
        if self.feature is not None and self.cfg.loss.schedule.stage1_steps:
            row["stage"] = loss_stage(step, self.cfg.loss.schedule.stage1_steps)
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
        if self.feature is None:
            return logit
        return feature_distill_loss(student, teacher_out, align, logit, engine.module.projector, self.feature, stage)


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
    return FeatureSettings(tuple(pairs), f.hidden_loss, f.hidden_weight, f.attention_weight)


@dataclass
class WorkerLoss:
    """What ``build`` hands the train loop."""

    loss: BatchLoss
    collate: object
    projector: FeatureProjector | None
    teacher_dir: str | None
    service: ServiceTopK | None = None

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


def build(cfg: DistillationConfig, total_steps: int, student_tok, student_config, max_seq_len: int,
          teacher_dir: str | None, teacher_tok=None) -> WorkerLoss:
    """Collate, projections and loss for this run's configuration (see the module docstring)."""
    stored_kd = cfg.loss.kind == "logit" and not cfg.online_teacher
    settings = CollateSettings(pad_id=pad_id(student_tok), max_seq_len=max_seq_len, packing=cfg.optim.packing,
                               with_teacher=stored_kd, xtok_map=cfg.loss.xtok.method == "vocab_map")
    loss = BatchLoss(cfg, total_steps)
    if cfg.service_teacher:
        ref = cfg.teacher.service
        topk = ServiceTopK(client_for(ref), teacher_tok, student_tok, ref.top_k)
        scored = ServiceCollate(settings, topk)
        if cfg.on_policy.enabled:  # chosen batches leave the collate unscored (rayjobs.distillation.on_policy)
            return WorkerLoss(loss, OnPolicyCollate(scored, cfg.on_policy.fraction, cfg.seed), None, None, topk)
        return WorkerLoss(loss, scored, None, None, topk)
    if not cfg.online_teacher:
        return WorkerLoss(loss, functools.partial(collate, settings=settings), None, None)
    from transformers import AutoConfig

    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    tokens = TeacherTokens(student_tok, teacher_tok, teacher_config.max_position_embeddings)
    projector = None
    if cfg.loss.kind == "feature":
        loss.feature = feature_settings(cfg, student_config.num_hidden_layers, teacher_config.num_hidden_layers)
        torch.manual_seed(cfg.seed)  # every rank builds the same projections
        projector = FeatureProjector(student_config.hidden_size, teacher_config.hidden_size, len(loss.feature.pairs))
    return WorkerLoss(loss, OnlineCollate(settings, tokens, pad_id(teacher_tok)), projector, teacher_dir)
