"""Cross-tokenizer logit distillation: teacher distributions moved onto the student's positions.

Pure numpy + torch (no engine import): the collator runs it in Ray Data's prefetch threads, the
online teacher and the CPU tests call it directly.

Positions. The generation stage aligns each student target token ``i`` with the teacher token
``j`` that starts at the same character of the completion (``teacher_align[i] = j``, see
``datasets_pipeline.alignment``). The stored top-k row ``j`` is the teacher's distribution for
"what follows that text", so it becomes the teacher at the student position that predicts token
``i``: ``t = prompt_len + i - 1``. Unaligned student tokens (their boundary falls inside a teacher
token) get no KD, only cross-entropy.

Method ``vocab_map`` (the default). The teacher's top-k ids are mapped to student ids
(``alignment.vocab_map``: same decoded text, else the student's first token of that text) and
ids that land on the same student id are merged by summing their probabilities (``merge_topk``).
The result is an ordinary ``TopKTeacher`` over student ids, so every divergence, temperature and
``tail`` of ``rayjobs.distillation.losses`` applies unchanged; the teacher mass that maps nowhere and the mass
outside its top-k both fall into the ``bucket`` rest bin. Why the default: it keeps token identity
(the student learns *which* token the teacher prefers, and with what margin), and it is exact
where the two vocabularies share tokens: on the demo world 301 of the student's 302 token texts
exist in the teacher's vocabulary, so it equals same-tokenizer KD there.

Method ``uld`` (Universal Logit Distillation, Boizard et al. 2024). Compares the *sorted*
probability vectors, ignoring which token each probability belongs to: ``sum_r |p_(r) - q_(r)|``
over the ranks ``r`` of the teacher's stored top-k and the student's own top-k, plus the two
rest masses (the bucket convention, tempered the same way). It needs no vocabulary relation at
all, which is its strength for unrelated tokenizers; it only teaches the *shape* (confidence) of
the teacher's distribution, which is its weakness: the correct token comes from cross-entropy
alone. Kept as the fallback for vocabularies that share little.

Both are scaled by T^2 and mixed with cross-entropy as ``(1 - alpha) * CE + alpha * KD``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rayjobs.distillation.losses import (
    LossOutput,
    LossSettings,
    TopKTeacher,
    reduce_terms,
    rest_log_masses,
    temper,
    token_terms,
)

METHODS = ("vocab_map", "uld")
NO_TOKEN = -1


def merge_topk(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids per position, duplicates merged by summed probability.

    ids: ``[..., k]`` int64, ``-1`` for none (padding or unmapped). logprobs: ``[..., k]``.
    Returns ``(ids, logprobs)`` of the same shape, each position's distinct ids first, then
    ``-1`` / ``0`` padding; the order of the distinct ids is ascending by id.
    """
    sorted_ids, order = ids.sort(dim=-1)
    probs = torch.where(sorted_ids >= 0, logprobs.gather(-1, order).float().exp(), 0.0)
    new_group = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_group[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    group = new_group.long().cumsum(-1) - 1
    merged = torch.zeros_like(probs).scatter_add_(-1, group, probs)
    merged_ids = torch.full_like(sorted_ids, NO_TOKEN).scatter_(-1, group, sorted_ids)
    valid = (merged_ids >= 0) & (merged > 0)
    # Move valid entries to the front so positions look like a compacted top-k.
    key = torch.where(valid, merged_ids, torch.iinfo(merged_ids.dtype).max)
    key, front = key.sort(dim=-1)
    merged, valid = merged.gather(-1, front), valid.gather(-1, front)
    out_ids = torch.where(valid, key, NO_TOKEN)
    out_lps = torch.where(valid, merged.clamp(min=torch.finfo(merged.dtype).tiny).log(), 0.0)
    return out_ids, out_lps


def aligned_teacher_xtok(
    length: int, prompt_len: int, teacher_align: Sequence[int], k: int, width: int, topk_ids, topk_logprobs,
    merge: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cross-tokenizer twin of ``rayjobs.distillation.collate.aligned_teacher``: same outputs and padding.

    ``topk_ids`` are student ids for ``vocab_map`` (merged here when ``merge``) and may be the
    teacher's own ids for ``uld``, which only looks at which entries exist.
    """
    ids = np.full((length, width), NO_TOKEN, np.int64)
    lps = np.zeros((length, width), np.float32)
    mask = np.zeros(length, bool)
    n_target = min(len(teacher_align), length - prompt_len)
    if k <= 0 or n_target <= 0 or prompt_len < 1:
        return ids, lps, mask
    rows = np.asarray(teacher_align[:n_target], np.int64)
    flat_ids = np.asarray(topk_ids, np.int64)
    n_teacher = len(flat_ids) // k
    # Student target token i is predicted at t = prompt_len + i - 1; t must hold a label (t <= length - 2).
    i = np.nonzero((rows >= 0) & (rows < n_teacher))[0]
    i = i[prompt_len + i - 1 <= length - 2]
    if not len(i):
        return ids, lps, mask
    t = prompt_len + i - 1
    sel_ids = torch.from_numpy(flat_ids.reshape(n_teacher, k)[rows[i]])
    sel_lps = torch.from_numpy(np.asarray(topk_logprobs, np.float32).reshape(n_teacher, k)[rows[i]])
    if merge:
        sel_ids, sel_lps = merge_topk(sel_ids, sel_lps)
    ids[t, :k] = sel_ids.numpy()
    lps[t, :k] = sel_lps.numpy()
    mask[t] = (ids[t] >= 0).any(-1)
    return ids, lps, mask


def map_teacher_topk(teacher_logits: torch.Tensor, vocab_map: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Online teacher ``[..., V_t]`` logits -> its top-k mapped to student ids and merged.

    vocab_map: ``[n]`` int64 teacher id -> student id (``-1`` unmapped), ``n <= V_t`` (rows past the
    tokenizer, e.g. embedding padding, map nowhere). The logprobs stay normalized over the
    teacher's full vocabulary, as ``TopKTeacher`` with ``tail="bucket"`` expects.
    """
    logprobs = torch.log_softmax(teacher_logits.float(), dim=-1)
    top_lps, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    padded = torch.full((logprobs.shape[-1],), NO_TOKEN, dtype=torch.long, device=vocab_map.device)
    n = min(len(vocab_map), len(padded))
    padded[:n] = vocab_map[:n]
    return merge_topk(padded.to(top_ids.device)[top_ids], top_lps)


def gather_positions(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, t] = values[b, index[b, t]]`` for ``[B, T_t, ...]`` values and ``[B, T_s]`` index.

    ``index < 0`` (unaligned) reads position 0; callers mask those positions.
    """
    safe = index.clamp(min=0)
    expand = safe.view(*safe.shape, *([1] * (values.dim() - 2))).expand(*safe.shape, *values.shape[2:])
    return values.gather(1, expand)


def uld_term(logits: torch.Tensor, lse: torch.Tensor, teacher: TopKTeacher, counted: torch.Tensor,
             settings: LossSettings) -> torch.Tensor:
    """ULD per position: ``sum_r |p_(r) - q_(r)|`` over sorted top-k + rest (a ``losses.KdTerm``).

    ``teacher.logprobs`` must be sorted descending per position (``datasets_pipeline.topk.compact_topk``
    stores them so) with ``ids = -1`` padding; the student side is its own top-k of ``logits``.
    """
    valid = teacher.ids >= 0
    k = teacher.ids.shape[-1]
    neg_inf = float("-inf")
    # Uncounted positions get finite dummies (as in losses.topk_support): no NaN in the backward.
    live = valid | ~counted[..., None]
    teacher_lp = torch.where(valid, teacher.logprobs.to(logits.dtype), 0.0).masked_fill(~live, neg_inf)
    student_lp = (logits.topk(min(k, logits.shape[-1]), dim=-1).values - lse[..., None])
    if student_lp.shape[-1] < k:
        pad = student_lp.new_full((*student_lp.shape[:-1], k - student_lp.shape[-1]), neg_inf)
        student_lp = torch.cat([student_lp, pad], dim=-1)
    teacher_rest, student_rest = rest_log_masses(teacher_lp, student_lp)
    p = temper(torch.cat([teacher_lp, teacher_rest], -1), settings.temperature).exp()
    q = temper(torch.cat([student_lp, student_rest], -1), settings.temperature).exp()
    return (p - q).abs().sum(-1)


def uld_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher: TopKTeacher,
             settings: LossSettings) -> LossOutput:
    """``(1 - alpha) * CE + alpha * T^2 * ULD`` (module docstring); shapes as ``losses.distill_loss``."""
    return reduce_terms(token_terms(student_logits, labels, teacher, settings, kd_term=uld_term), settings)
