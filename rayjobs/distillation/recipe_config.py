"""Config sections of the practitioner's recipes (issue 21): temperature phases, progressive layers,
feature noise, training-only dropout, the contrastive auxiliary loss.

Kept apart from ``rayjobs.distillation.config`` (which embeds them) so each recipe's knobs sit with
their validation; the code that runs them is ``schedule`` (phases, layer schedule),
``regularize`` (noise, dropout) and ``contrastive``.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from cluster.config import StrictModel


class TemperaturePhase(StrictModel):
    """One phase of an explicit KD temperature schedule; the last phase has no end."""

    temperature: float = Field(gt=0.0, description="KD temperature while this phase lasts.")
    until_step: int | None = Field(None, ge=1, description="The phase covers optimizer steps up to this one.")
    until_epoch: float | None = Field(None, gt=0.0, description="The phase covers this many epochs from the start.")

    @model_validator(mode="after")
    def _one_end(self):
        if self.until_step is not None and self.until_epoch is not None:
            raise ValueError("a temperature phase ends at until_step or until_epoch, not both")
        return self


def check_phases(phases: list[TemperaturePhase]) -> list[TemperaturePhase]:
    """Every phase but the last ends, in one unit, at increasing bounds; the last one runs on."""
    if not phases:
        raise ValueError("schedule.temperatures is empty")
    *bounded, last = phases
    if last.until_step is not None or last.until_epoch is not None:
        raise ValueError("the last schedule.temperatures phase has no until_step/until_epoch (it runs to the end)")
    ends = [p.until_step if p.until_step is not None else p.until_epoch for p in bounded]
    if any(e is None for e in ends):
        raise ValueError("every schedule.temperatures phase but the last needs until_step or until_epoch")
    if len({p.until_step is None for p in bounded}) > 1:
        raise ValueError("schedule.temperatures phases end all in steps or all in epochs, not a mix")
    if any(b <= a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"schedule.temperatures phase ends must increase, got {ends}")
    return phases


class ProgressiveLayers(StrictModel):
    """Feature distillation from the bottom up: lower layer pairs train first, upper ones join later.

    Early on the student's upper blocks sit on lower blocks that still move; matching them to the
    teacher then chases a moving target. Lower layers first gives the upper ones a settled input.
    """

    every: int | None = Field(
        None, ge=1, description="Pairs join by student layer, lowest first: the n-th lowest student index joins "
        "at optimizer step n * every (pairs sharing a student index join together).")
    start_steps: list[int] | None = Field(
        None, description="The optimizer step (0-based) at which each layer_map pair joins, one per pair in "
        "layer_map order; at least one pair must start at 0.")

    @model_validator(mode="after")
    def _one_form(self):
        if (self.every is None) == (self.start_steps is None):
            raise ValueError("feature.progressive takes every or start_steps (exactly one)")
        if self.start_steps is not None and (not self.start_steps or min(self.start_steps) != 0
                                             or any(s < 0 for s in self.start_steps)):
            raise ValueError("feature.progressive.start_steps are >= 0 and one pair starts at step 0 "
                             f"(something must train from the start), got {self.start_steps}")
        return self


class FeatureNoise(StrictModel):
    """Gaussian noise on the student's hidden states where they enter the feature loss (training only).

    The student must match the teacher's features from a perturbed view of its own, which keeps it
    from fitting the projection to incidental detail. The noise is relative: ``sigma`` times each
    hidden vector's RMS, so one value means the same across layers and widths.
    """

    sigma: float = Field(gt=0.0, description="Noise std as a fraction of each hidden vector's RMS, at the first step.")
    sigma_end: float | None = Field(
        None, ge=0.0, description="Linear ramp from sigma to this at the last step; null: constant sigma.")


class DropoutConfig(StrictModel):
    """Model dropout while training only: the merged model and every evaluation run without it."""

    attention: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention probabilities (the model "
                             "config's attention_dropout / attn_pdrop); 0: the model's own setting.")
    hidden: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on every transformer block's output hidden "
                          "states (a hook, so it works for architectures without a hidden-dropout knob).")


class ContrastiveConfig(StrictModel):
    """InfoNCE between pooled student and teacher hidden states (``rayjobs.distillation.contrastive``)."""

    weight: float = Field(0.0, ge=0.0, description="Weight of the contrastive term in the loss; 0: off. Needs an "
                          "online teacher (kind 'feature', or 'logit' with teacher.source 'online').")
    temperature: float = Field(0.1, gt=0.0, description="InfoNCE softmax temperature over cosine similarities.")
    student_layer: int = Field(-1, description="Student hidden-state index pooled (0 = embeddings, -1 = last).")
    teacher_layer: int = Field(-1, description="Teacher hidden-state index pooled (0 = embeddings, -1 = last).")
