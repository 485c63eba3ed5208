"""Distillation losses: cross-entropy on the teacher's text and KD against a teacher distribution.

Pure torch, no engine import, so the trainer and CPU tests share one implementation.

Layout. Every divergence in ``DIVERGENCES`` is ONE function of ``(log_p, log_q, settings)``:
teacher and student log-probabilities over a *support* dimension (the last one), returning the
per-position divergence. Zero mass is ``-inf`` and contributes exactly zero (``0 log 0 = 0``), with
finite gradients. The top-k and dense paths only build that support:

* dense teacher ``[B, T, V]``: the support is the vocabulary.
* stored teacher top-k ``[B, T, k]``: the support is the teacher's k ids, plus one bin with
  ``tail="bucket"``. Padding ids (``-1``) become ``-inf`` on both sides.

Mass outside the teacher's top-k (``tail``). vLLM returns the k most likely ids of the teacher
``p`` and nothing about the rest, so the loss must say what it does with the missing tail.
With ``S`` the top-k set and ``q`` the student:

* ``"renormalize"``: compare ``p`` and ``q`` *conditioned on S* (each renormalized over S). This
  only shapes the student's relative probabilities inside S; mass the student leaks outside S is
  not penalized. Exact for the conditional distributions; equals the dense loss when S is the
  whole vocabulary (k = V) or both put no mass outside S. (TRL GOLD's ``top_k`` does this.)
* ``"bucket"``: coarse-grain the vocabulary into k + 1 bins, the k ids and one "rest" bin with
  ``1 - sum_S p`` for the teacher and ``1 - sum_S q`` for the student (exact, from the full student
  logits). Both are proper distributions over the bins and leaking student mass is penalized. At
  T = 1 the binned divergence is a lower bound of the dense one (data-processing inequality; all
  five are f-divergences), equal when the student's tail is proportional to the teacher's, in
  particular when k = V (empty tail). The rest mass is floored at k * eps, the precision of
  ``1 - sum`` (see ``rest_log_masses``). The default of ``rayjobs.distillation.config.LossConfig``.

Temperature T is applied after building the support at T = 1: ``log_softmax(log_probs / T)`` over
the support, for teacher and student alike. For renormalize that equals tempering the full
distributions, then restricting and renormalizing. For bucket the rest bin is tempered as one
pseudo-token: the teacher's tempered tail mass depends on the tail's unknown shape, and treating
both sides alike keeps the loss zero exactly when the binned distributions agree. With k = V the
rest bins are empty, so both modes equal the dense loss at every T. The KD term is scaled by T^2
(Hinton et al.) so its gradient magnitude does not shrink as T grows.

Generalized JSD, TRL GKD convention (``GKDTrainer.generalized_jsd_loss``, Agarwal et al. Eq. 1):
``JSD_b(p || q) = b KL(p || m) + (1 - b) KL(q || m)`` with ``m = b p + (1 - b) q`` and p the
teacher. As in TRL, b = 0 is defined as forward KL(p || q) and b = 1 as reverse KL(q || p): the
mixture formula itself goes to 0 at both ends, but ``JSD_b / b -> KL(p || q)`` as b -> 0 and
``JSD_b / (1 - b) -> KL(q || p)`` as b -> 1, so the endpoints are the directions it leans to.
Skew KL (DistiLLM, Ko et al. 2024): ``skew_kl = KL(p || l p + (1 - l) q)`` and
``skew_reverse_kl = KL(q || l q + (1 - l) p)``; l = 0 gives the plain directions.

Reduction is a token-level mean: the sum over counted positions divided by their number, so a
batch's long and short sequences weigh per token. Logits are upcast to at least float32.

Memory: the vocabulary is reduced once (one logsumexp, shared by cross-entropy and top-k KD);
top-k KD then works on ``[B, T, k + 1]`` gathered values. Only the dense path holds ``[B, T, V]``
log-probabilities of both models.

Two layers: ``token_terms`` gives each position's cross-entropy and divergence from a block of
logits, ``reduce_terms`` turns them into the token means and the mix. The trainer never holds a
whole batch's logits: ``rayjobs.distillation.chunked_head`` runs the head and these two functions
over a few hundred tokens at a time, with the batch's token counts, so the chunks' losses add up to
``distill_loss`` of the whole batch (one definition of every term for both paths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

IGNORE_INDEX = -100

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class LossSettings:
    """Which loss and its knobs; field names match ``rayjobs.distillation.config.LossConfig``.

    ``kind="data"`` is cross-entropy only (the teacher's text is the data); ``"logit"`` mixes in
    KD as ``(1 - alpha) * CE + alpha * KD`` and needs a teacher.
    """

    kind: Literal["data", "logit"] = "data"
    divergence: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    lam: float = 0.1
    tail: Literal["renormalize", "bucket"] = "bucket"

    def __post_init__(self):
        if self.kind not in ("data", "logit"):
            raise ValueError(f"kind must be 'data' or 'logit', got {self.kind!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; known: {sorted(DIVERGENCES)}")
        if self.tail not in ("renormalize", "bucket"):
            raise ValueError(f"tail must be 'renormalize' or 'bucket', got {self.tail!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("alpha", "beta", "lam"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class TopKTeacher:
    """The teacher's stored top-k, aligned with the student's positions.

    ids: ``[B, T, k]`` int64 token ids, ``-1`` where fewer than k are available. Distinct per
        position and below the student's vocabulary size (not checked: it would sync the GPU).
    logprobs: ``[B, T, k]`` float, teacher log-probabilities at temperature 1 (as vLLM returns
        them, i.e. normalized over the full vocabulary; ``bucket`` relies on that).
    mask: ``[B, T]`` bool or 0/1, positions that carry teacher information; None means all.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class DenseTeacher:
    """Full teacher logits (online teacher).

    logits: ``[B, T, V]`` float, same vocabulary as the student.
    mask: ``[B, T]`` bool or 0/1, positions that carry teacher information; None means all.
    """

    logits: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class LossOutput:
    """``total`` is what to backpropagate; the rest is for logging and token-weighted averaging.

    ce, kd: token means (kd already scaled by T^2; zero when not computed).
    num_tokens: positions with a label (``labels != -100``), 0-dim int64 tensor.
    num_kd_tokens: of those, positions that also carry teacher information.
    """

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    num_tokens: torch.Tensor
    num_kd_tokens: torch.Tensor


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``sum_i a_i (log a_i - log b_i)`` over the last dim; terms with ``a_i = 0`` are exactly 0.

    Those terms are filled *before* the arithmetic: computing ``-inf - -inf`` and masking after
    would still send NaN into the backward pass.
    """
    dead = log_a == _NEG_INF
    log_a = log_a.masked_fill(dead, 0.0)
    log_b = log_b.masked_fill(dead, 0.0)
    return (log_a.exp() * (log_a - log_b)).masked_fill(dead, 0.0).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """``log(weight * a + (1 - weight) * b)`` elementwise, NaN-free where both are zero."""
    if weight == 0.0:
        return log_b
    if weight == 1.0:
        return log_a
    dead = (log_a == _NEG_INF) & (log_b == _NEG_INF)
    mixed = torch.logaddexp(
        log_a.masked_fill(dead, 0.0) + math.log(weight),
        log_b.masked_fill(dead, 0.0) + math.log1p(-weight),
    )
    return mixed.masked_fill(dead, _NEG_INF)


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """KL(teacher || student): mass-covering, the classic KD objective."""
    return kl(log_p, log_q)


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """KL(student || teacher): mode-seeking, favoured for on-policy distillation."""
    return kl(log_q, log_p)


def jsd(log_p: torch.Tensor, log_q: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """Generalized JSD with ``beta`` (TRL GKD convention, see the module docstring)."""
    beta = settings.beta
    if beta == 0.0:
        return kl(log_p, log_q)
    if beta == 1.0:
        return kl(log_q, log_p)
    log_m = _mix(log_p, log_q, beta)
    return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)


def skew_kl(log_p: torch.Tensor, log_q: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """KL(p || lam p + (1 - lam) q): forward KL that stays finite where the student is ~0."""
    return kl(log_p, _mix(log_p, log_q, settings.lam))


def skew_reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """KL(q || lam q + (1 - lam) p): reverse KL that stays finite where the teacher is ~0."""
    return kl(log_q, _mix(log_q, log_p, settings.lam))


Divergence = Callable[[torch.Tensor, torch.Tensor, LossSettings], torch.Tensor]

DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
}


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def rest_log_masses(teacher_lp: torch.Tensor, student_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log of the mass outside the support, ``log(1 - sum exp(lp))``, for teacher and student.

    ``1 - sum`` over k stored values is only known to within ``tau = k * eps``. Below ``tau`` on
    both sides the tail is empty (k = V) and the bin is dropped (``-inf``), which keeps k = V equal
    to the dense loss: a floored bin would be amplified to ``tau ** (1 / T)`` by tempering.
    Otherwise both are floored at ``tau``, so reverse KL stays finite when the student leaks mass
    the teacher's rounding hid.
    """
    tau = teacher_lp.shape[-1] * torch.finfo(teacher_lp.dtype).eps
    rests = [-torch.expm1(torch.logsumexp(lp, dim=-1, keepdim=True)) for lp in (teacher_lp, student_lp)]
    empty = (rests[0] <= tau) & (rests[1] <= tau)
    teacher_rest, student_rest = (r.clamp(min=tau).log().masked_fill(empty, _NEG_INF) for r in rests)
    return teacher_rest, student_rest


def temper(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Tempered, renormalized log-probabilities over the support; also renormalizes at T = 1."""
    return torch.log_softmax(log_probs / temperature, dim=-1)


def topk_support(
    student_logits: torch.Tensor,
    student_lse: torch.Tensor,
    teacher: TopKTeacher,
    counted: torch.Tensor,
    settings: LossSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``(log_p, log_q)`` over the teacher's top-k support (plus a rest bin), tempered.

    student_logits: ``[B, T, V]``, already in the compute dtype.
    student_lse: ``[B, T]``, logsumexp of ``student_logits`` over V, shared with cross-entropy so
        the vocabulary is reduced once; only ``[B, T, k]`` values are gathered from the logits.
    counted: ``[B, T]`` bool, the positions in the loss (``kd_positions``: each has an id).
    Returns log_p, log_q ``[B, T, S]`` with S = k (renormalize) or k + 1 (bucket). Uncounted
    positions are filled with finite dummies (id 0, log-prob 0) whatever the stored values, so that
    no row is all ``-inf`` and they add exactly zero, and no NaN, to the gradient.
    """
    ids, teacher_lp = teacher.ids, teacher.logprobs.to(student_logits.dtype)
    valid = (ids >= 0) & counted[..., None]
    live = valid | ~counted[..., None]
    floor = math.log(torch.finfo(teacher_lp.dtype).tiny)
    teacher_lp = torch.where(valid, teacher_lp.clamp(min=floor), 0.0).masked_fill(~live, _NEG_INF)
    gathered = student_logits.gather(-1, torch.where(valid, ids, 0))
    student_lp = (gathered - student_lse[..., None]).masked_fill(~live, _NEG_INF)
    if settings.tail == "bucket":
        teacher_rest, student_rest = rest_log_masses(teacher_lp, student_lp)
        teacher_lp = torch.cat([teacher_lp, teacher_rest], dim=-1)
        student_lp = torch.cat([student_lp, student_rest], dim=-1)
    return temper(teacher_lp, settings.temperature), temper(student_lp, settings.temperature)


def dense_support(
    student_logits: torch.Tensor, teacher: DenseTeacher, counted: torch.Tensor, settings: LossSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``(log_p, log_q)`` over the full vocabulary, tempered; shapes as top-k.

    Teacher logits at uncounted positions are replaced by zeros (they may be padding garbage).
    """
    if teacher.logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher.logits.shape)} != student {tuple(student_logits.shape)}")
    t = settings.temperature
    teacher_logits = torch.where(counted[..., None], teacher.logits.to(student_logits.dtype), 0.0)
    log_p = torch.log_softmax(teacher_logits / t, dim=-1)
    log_q = torch.log_softmax(student_logits / t, dim=-1)
    return log_p, log_q


def token_mean(values: torch.Tensor, counted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = counted.sum()
    return torch.where(counted, values, 0.0).sum() / n.clamp(min=1), n


def kd_positions(labels: torch.Tensor, teacher) -> torch.Tensor:
    """Positions in the KD mean: a label, the teacher's mask, and for a top-k teacher at least one id.

    Needs no logits, so a chunked loss knows the batch's KD token count before its first chunk.
    """
    counted = labels != IGNORE_INDEX
    if teacher.mask is not None:
        counted = counted & teacher.mask.bool()
    if isinstance(teacher, TopKTeacher):
        counted = counted & (teacher.ids >= 0).any(-1)
    return counted


# A KD term: ``(logits, lse, teacher, counted, settings)`` -> per-position value, finite everywhere.
KdTerm = Callable[[torch.Tensor, torch.Tensor, object, torch.Tensor, LossSettings], torch.Tensor]


def divergence_term(logits: torch.Tensor, lse: torch.Tensor, teacher: TopKTeacher | DenseTeacher,
                    counted: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """``settings.divergence`` over the top-k support or the full vocabulary, per position."""
    if isinstance(teacher, TopKTeacher):
        log_p, log_q = topk_support(logits, lse, teacher, counted, settings)
    else:
        log_p, log_q = dense_support(logits, teacher, counted, settings)
    return DIVERGENCES[settings.divergence](log_p, log_q, settings)


@dataclass(frozen=True)
class TokenTerms:
    """Per-position values before the token means: ``ce`` (zero without a label) and ``kd`` (zero
    where not counted, not yet scaled by T^2), with the masks that count them."""

    ce: torch.Tensor
    kd: torch.Tensor
    has_label: torch.Tensor
    counted: torch.Tensor


def token_terms(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: TopKTeacher | DenseTeacher | None = None,
    settings: LossSettings = LossSettings(),
    kd_term: KdTerm = divergence_term,
    lse: torch.Tensor | None = None,
) -> TokenTerms:
    """Each position's cross-entropy and KD term; shapes as ``distill_loss``, any leading dims.

    The logits are upcast to at least float32 and reduced over V once (the logsumexp is shared by
    cross-entropy and the KD term). ``kd_term`` is ``divergence_term`` or ULD's
    (``rayjobs.distillation.xtok.uld_term``). ``lse``: the logsumexp over the full vocabulary when
    given; then ``student_logits`` need only hold the columns that labels and top-k ids point at
    (the chunked head passes them compacted, ``chunked_head._compact_chunk``).
    """
    logits = student_logits.to(_compute_dtype(student_logits))
    has_label = labels != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1) if lse is None else lse
    target = logits.gather(-1, torch.where(has_label, labels, 0)[..., None]).squeeze(-1)
    ce = torch.where(has_label, lse - target, 0.0)
    if settings.kind == "data":
        return TokenTerms(ce, torch.zeros_like(ce), has_label, torch.zeros_like(has_label))
    if teacher is None:
        raise ValueError("kind='logit' needs a teacher (TopKTeacher or DenseTeacher)")
    counted = kd_positions(labels, teacher)
    kd = torch.where(counted, kd_term(logits, lse, teacher, counted, settings), 0.0)
    return TokenTerms(ce, kd, has_label, counted)


def reduce_terms(terms: TokenTerms, settings: LossSettings, num_tokens: torch.Tensor | None = None,
                 num_kd_tokens: torch.Tensor | None = None) -> LossOutput:
    """``(1 - alpha) * CE + alpha * T^2 * KD`` (CE alone for ``kind="data"``) from token sums.

    The counts default to the masks' own; a chunk of a batch passes the whole batch's counts, so
    the chunks' outputs (total, ce, kd) add up to the batch's.
    """
    n = terms.has_label.sum() if num_tokens is None else num_tokens
    n_kd = terms.counted.sum() if num_kd_tokens is None else num_kd_tokens
    ce = terms.ce.sum() / n.clamp(min=1)
    kd = terms.kd.sum() / n_kd.clamp(min=1) * settings.temperature**2
    total = ce if settings.kind == "data" else (1.0 - settings.alpha) * ce + settings.alpha * kd
    return LossOutput(total, ce, kd, n, n_kd)


def distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: TopKTeacher | DenseTeacher | None = None,
    settings: LossSettings = LossSettings(),
) -> LossOutput:
    """``(1 - alpha) * CE + alpha * T^2 * KD``, each a mean over its counted tokens.

    student_logits: ``[B, T, V]``; position t predicts ``labels[:, t]`` (shift done by the caller),
        and the teacher's entries at t describe that same next token.
    labels: ``[B, T]`` int64, the teacher's text; ``-100`` marks positions that count for neither
        term (prompt, padding).
    teacher: required when ``settings.kind == "logit"``; ignored for ``"data"``.
    """
    return reduce_terms(token_terms(student_logits, labels, teacher, settings), settings)
