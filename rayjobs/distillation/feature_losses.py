"""Feature distillation: hidden states through learned projections, attention maps, layer mapping.

Pure torch (no engine import), shared by the online-teacher train loop and the CPU tests. Teacher
and student may differ in width, depth, head count and tokenizer; everything here works on the
student's position grid, with ``align_index[b, p]`` the teacher position that has consumed the
same text as student position ``p`` (``-1``: none; see ``rayjobs.distillation.online_teacher``).

Layer mapping. ``hidden_states`` of an HF decoder has ``L + 1`` entries: 0 is the embeddings, ``i``
the output of block ``i`` (the last one after the final norm). A mapping is a list of
``(student i, teacher j)`` pairs over those indices. The default, when depths differ, is uniform:
student block ``i`` -> teacher block ``round(i * L_t / L_s)``, so the last blocks meet and the
others are spread evenly (TinyBERT's "uniform" strategy); with equal depths it is ``i -> i``.

Hidden-state loss. Each mapped student state goes through its own learned linear projection
(student width -> teacher width; ``FeatureProjector``) and is compared with the teacher's state at
the aligned position: ``mse`` (mean squared error per dimension; sensitive to the teacher's scale)
or ``cosine`` (``1 - cos``; scale-free and bounded in [0, 2], so its weight means the same for any
pair of models: the default). Averaged over aligned positions (token mean), then over pairs. The
projections are trained with the student (they live in the DeepSpeed engine beside it, see
``DistillModule``) and dropped at merge: they are a training-time adapter, not part of the model.

Attention loss (the reduction, since head counts differ and heads cannot be paired one to one):
for each mapped block pair both models' attention probabilities are averaged over heads into one
``[T, T]`` map per sequence (how much each position reads from each earlier one), restricted to
query and key positions that are aligned (the teacher map is gathered onto the student's grid),
each row renormalized over those keys, and compared with ``KL(teacher row || student row)``,
token mean over aligned queries, mean over pairs. Pairs whose student index is 0 (embeddings) have
no attention and are skipped. Attention probabilities need ``attn_implementation="eager"``.

Schedules (``rayjobs.distillation.schedule.loss_phase``): in stage 1 only the hidden-state loss trains; in
stage 2 the total is ``(1 - alpha) * CE + alpha * T^2 * KD + w_h * hidden + w_a * attention``.
Progressive layers (``FeatureSettings.start_steps``): a pair counts in both feature losses from its
start step on; until then it is not computed at all, and the means run over the pairs in force.
Feature noise (``rayjobs.distillation.regularize.feature_noise``) perturbs the student's states
before their projection, in training only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rayjobs.distillation.losses import LossOutput, kl, token_mean
from rayjobs.distillation.regularize import feature_noise
from rayjobs.distillation.schedule import active_pairs
from rayjobs.distillation.xtok import gather_positions

HIDDEN_LOSSES = ("mse", "cosine")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student block ``i`` (1-based) -> teacher block ``i * L_t / L_s`` rounded half up, at least 1."""
    return [(i, max(1, (2 * i * teacher_layers + student_layers) // (2 * student_layers)))
            for i in range(1, student_layers + 1)]


def check_layer_map(pairs: Sequence[Sequence[int]], student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Validated pairs; ``ValueError`` names the first pair out of range."""
    if not pairs:
        raise ValueError("layer_map is empty")
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"layer_map entry {list(pair)} is not a [student, teacher] pair")
        s, t = int(pair[0]), int(pair[1])
        if not 0 <= s <= student_layers or not 0 <= t <= teacher_layers:
            raise ValueError(f"layer_map pair [{s}, {t}] is outside the student's 0..{student_layers} "
                             f"or the teacher's 0..{teacher_layers} hidden states")
        out.append((s, t))
    return out


class FeatureProjector(nn.Module):
    """One linear map (student width -> teacher width) per mapped layer pair."""

    def __init__(self, student_width: int, teacher_width: int, num_pairs: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in range(num_pairs))

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj[index](hidden)


class DistillModule(nn.Module):
    """The student plus the projections (feature and/or contrastive), as one module for DeepSpeed (one
    optimizer, one checkpoint).

    ``forward`` is the student's. ``student_state_dict`` is what the merge exports: the student's
    keys only, with this wrapper's prefix removed.
    """

    PREFIX = "student."

    def __init__(self, student: nn.Module, projector: FeatureProjector | None, contrastive: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.projector = projector
        self.contrastive = contrastive

    def forward(self, **kwargs):
        return self.student(**kwargs)

    def get_output_embeddings(self) -> nn.Module:
        """The student's head: the chunked loss runs it (``rayjobs.distillation.chunked_head``)."""
        return self.student.get_output_embeddings()

    @classmethod
    def student_state_dict(cls, state_dict: dict) -> dict:
        return {k[len(cls.PREFIX):]: v for k, v in state_dict.items() if k.startswith(cls.PREFIX)}


@dataclass(frozen=True)
class FeatureSettings:
    pairs: tuple[tuple[int, int], ...]
    hidden_loss: str = "cosine"
    hidden_weight: float = 1.0
    attention_weight: float = 0.0
    start_steps: tuple[int, ...] | None = None  # progressive layers: each pair's first step; None: all from 0

    def __post_init__(self):
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss must be one of {HIDDEN_LOSSES}, got {self.hidden_loss!r}")
        if self.start_steps is not None and (len(self.start_steps) != len(self.pairs) or min(self.start_steps) != 0):
            raise ValueError(f"start steps {self.start_steps} for {len(self.pairs)} layer pairs: one per pair, "
                             "and one pair from step 0")

    def active(self, step: int) -> tuple[bool, ...]:
        """Which pairs the feature losses count at update ``step + 1``."""
        return active_pairs(step, self.start_steps, len(self.pairs))


@dataclass(frozen=True)
class FeatureLossOutput:
    """``rayjobs.distillation.losses.LossOutput``'s fields plus the two feature terms (unweighted means)."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    hidden: torch.Tensor
    attention: torch.Tensor
    num_tokens: torch.Tensor
    num_kd_tokens: torch.Tensor


def hidden_state_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                      align_index: torch.Tensor, mask: torch.Tensor, projector: FeatureProjector,
                      settings: FeatureSettings, active: Sequence[bool] | None = None,
                      sigma: float = 0.0) -> torch.Tensor:
    """Mean over the ``active`` pairs (default all) of the token-mean hidden loss at aligned positions
    (``mask`` ``[B, T_s]``); ``sigma``: relative Gaussian noise on the student's states first."""
    terms = []
    for k, (s, t) in enumerate(settings.pairs):
        if active is not None and not active[k]:
            continue
        student = projector(k, feature_noise(student_hidden[s].float(), sigma))
        teacher = gather_positions(teacher_hidden[t].float(), align_index)
        if settings.hidden_loss == "mse":
            per_token = (student - teacher).pow(2).mean(-1)
        else:
            per_token = 1.0 - nn.functional.cosine_similarity(student, teacher, dim=-1, eps=1e-6)
        terms.append(token_mean(per_token, mask)[0])
    return torch.stack(terms).mean()


def _aligned_rows(attn: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Head-mean ``[B, T, T]`` map over the ``allowed`` ``[B, T, T]`` entries, renormalized, as log-probs.

    Allowed entries are floored at the smallest normal float before the log, so an underflowed
    attention weight costs a large but finite KL; the rest are ``-inf`` (zero mass).
    """
    tiny = torch.finfo(torch.float32).tiny
    rows = attn.float().mean(1).masked_fill(~allowed, 0.0)
    rows = rows / rows.sum(-1, keepdim=True).clamp(min=tiny)
    return rows.clamp(min=tiny).log().masked_fill(~allowed, float("-inf"))


def attention_map_loss(student_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor],
                       align_index: torch.Tensor, mask: torch.Tensor, settings: FeatureSettings,
                       active: Sequence[bool] | None = None) -> torch.Tensor:
    """Mean over the ``active`` pairs (student block >= 1) of the head-averaged attention KL (module docstring).

    Allowed entries: aligned query and key, key not after the query. The alignment is monotone,
    so the teacher's gathered map is causal on the same entries.
    """
    n = mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    allowed = mask[:, :, None] & mask[:, None, :] & causal
    safe = align_index.clamp(min=0)
    terms = []
    for k, (s, t) in enumerate(settings.pairs):
        if s == 0 or t == 0 or (active is not None and not active[k]):
            continue
        teacher = teacher_attn[t - 1].float().mean(1, keepdim=True)
        rows = teacher.gather(2, safe[:, None, :, None].expand(-1, 1, -1, teacher.shape[-1]))
        teacher = rows.gather(3, safe[:, None, None, :].expand(-1, 1, rows.shape[2], -1))
        per_query = kl(_aligned_rows(teacher, allowed), _aligned_rows(student_attn[s - 1], allowed))
        terms.append(token_mean(per_query, mask)[0])
    if not terms and active is not None and not all(active):
        return mask.new_zeros((), dtype=torch.float32)  # the pairs with attention have not joined yet
    if not terms:
        raise ValueError("attention loss needs a layer pair with student and teacher blocks >= 1")
    return torch.stack(terms).mean()


def feature_distill_loss(
    student_out, teacher_out, align_index: torch.Tensor, logit: LossOutput, projector: FeatureProjector,
    settings: FeatureSettings, stage: int, step: int = 0, sigma: float = 0.0,
) -> FeatureLossOutput:
    """Stage 1: ``w_h * hidden``; stage 2 adds CE + KD (``logit``) and ``w_a * attention`` (module docstring).

    student_out / teacher_out: HF outputs with ``hidden_states`` and, when the attention weight is
    on, ``attentions``. ``logit``: the student's CE and KD against the teacher's logits, already
    computed by the chunked head (``rayjobs.distillation.chunked_head``). ``align_index``
    ``[B, T_s]``: teacher position per student position, ``-1`` where none (padding included).
    ``step``: the update (0-based) the progressive layer schedule is read at; ``sigma``: feature noise.
    """
    aligned, active = align_index >= 0, settings.active(step)
    hidden = hidden_state_loss(student_out.hidden_states, teacher_out.hidden_states, align_index, aligned,
                               projector, settings, active, sigma)
    zero = hidden.new_zeros(())
    if stage == 1:
        return FeatureLossOutput(settings.hidden_weight * hidden, logit.ce.detach(), zero, hidden, zero,
                                 logit.num_tokens, logit.num_kd_tokens)
    attention = zero
    if settings.attention_weight > 0:
        attention = attention_map_loss(student_out.attentions, teacher_out.attentions, align_index, aligned,
                                       settings, active)
    total = logit.total + settings.hidden_weight * hidden + settings.attention_weight * attention
    return FeatureLossOutput(total, logit.ce, logit.kd, hidden, attention, logit.num_tokens, logit.num_kd_tokens)
