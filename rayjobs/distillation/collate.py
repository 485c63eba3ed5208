"""Sample rows -> padded (or packed) training tensors, teacher top-k aligned to student positions.

Pure numpy + torch, no engine import: the train loop runs it inside Ray Data's prefetch threads
(``iter_torch_batches(collate_fn=...)``) and the plain-PyTorch benchmark calls it directly.

Alignment. A row (``datasets_pipeline.records.SAMPLE_SCHEMA``) holds ``input_ids`` = student prompt
+ target; the first ``prompt_len`` tokens are the prompt. Position ``t`` of the student's logits
predicts token ``t + 1``, so the *shifted* labels are ``labels[t] = input_ids[t + 1]`` where
``t + 1 >= prompt_len`` and ``-100`` elsewhere (prompt, the last position, padding). This is the
convention of ``rayjobs.distillation.losses.distill_loss`` ("shift done by the caller").

The teacher's top-k are stored per *teacher* token ``j`` (flat, token-major): the teacher's
distribution over the token it generated at step ``j``. With ``teacher_offset = o``, teacher token
``j`` sits at ``input_ids[o + j]``, so the student position that predicts it is ``t = o + j - 1``:
``teacher[t] = topk[t + 1 - o]``. The eos appended by preprocessing (when the teacher's text did
not end with it) has no top-k and gets no KD mask, only cross-entropy.

Rows with ``teacher_offset = -1`` (student tokens differ from the teacher's) take their teacher from
the cross-tokenizer alignment the generation stage stored (``teacher_align``: per student target
token, the teacher token starting at the same character; ``rayjobs.distillation.xtok.aligned_teacher_xtok``),
with the stored teacher top-k ids mapped to student ids here, through ``CollateSettings.vocab_map``
(``datasets_pipeline.vocab_cache.cached_vocab_map``, loaded once per worker by
``rayjobs.distillation.batch_loss.build``): the map is one int32 per teacher id, so mapping at
training time saves the shards 4 bytes per top-k entry (80 per token at k = 20). Rows with neither
(stripped reasoning, texts that did not align) get no KD mask, only cross-entropy.

Packing (``packing=True``). The micro-batch's rows are packed first-fit-decreasing into rows of
``max_seq_len`` tokens. Each packed row carries ``position_ids`` restarting at 0 for every sample
and no ``attention_mask``: transformers then derives a block-diagonal causal mask from the
position restarts (``masking_utils.find_packed_sequence_indices``), so samples never attend to
each other. Tail padding forms its own segment with all labels ignored. The number of *samples*
per micro-batch is unchanged, so step counts do not depend on packing; only padding shrinks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from datasets_pipeline.alignment import map_ids
from rayjobs.distillation.xtok import aligned_teacher_xtok

IGNORE_INDEX = -100
NO_TOKEN = -1

# Columns the collator reads; the teacher ones only when KD is on (they are the bulk of the bytes).
BASE_COLUMNS = ("input_ids", "prompt_len", "teacher_offset")
TEACHER_COLUMNS = ("topk_k", "topk_ids", "topk_logprobs", "teacher_align")


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos.

    Many causal-LM tokenizers (GPT-2, Llama) define no pad token. Padded positions are masked out
    of attention and labels, so the filler only has to be a valid id of the model's vocabulary.
    """
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass(frozen=True)
class CollateSettings:
    pad_id: int
    max_seq_len: int
    packing: bool = False
    with_teacher: bool = True
    # Cross-tokenizer rows: KD over the stored ids mapped to student ids (``vocab_map``), or over
    # the teacher's own ids, which only ULD can use (it ignores which token each probability is).
    xtok_map: bool = True
    # Teacher id -> student id (int32 ``[V_t]``, -1 unmapped); needed when ``xtok_map`` meets a
    # cross-tokenizer row. One array per worker, shared by every batch.
    vocab_map: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def columns(self) -> tuple[str, ...]:
        return BASE_COLUMNS + (TEACHER_COLUMNS if self.with_teacher else ())


@dataclass
class _Segment:
    """One sample, truncated to max_seq_len, labels shifted, teacher aligned ([L, k] or None)."""

    ids: np.ndarray
    labels: np.ndarray
    teacher_ids: np.ndarray | None
    teacher_logprobs: np.ndarray | None
    teacher_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def shifted_labels(ids: np.ndarray, prompt_len: int) -> np.ndarray:
    """``labels[t] = ids[t + 1]`` for target tokens, ``-100`` for the prompt and the last position."""
    labels = np.full(len(ids), IGNORE_INDEX, np.int64)
    if len(ids) > 1:
        labels[:-1] = ids[1:]
    labels[: max(int(prompt_len) - 1, 0)] = IGNORE_INDEX
    return labels


def aligned_teacher(
    length: int, teacher_offset: int, k: int, width: int, topk_ids, topk_logprobs
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher top-k at student positions: ``([L, width] ids, [L, width] logprobs, [L] mask)``.

    ``width >= k`` is the batch's k; extra columns are id -1. Positions without a teacher
    distribution have ids -1, logprobs 0 and mask False.
    """
    ids = np.full((length, width), NO_TOKEN, np.int64)
    lps = np.zeros((length, width), np.float32)
    mask = np.zeros(length, bool)
    if teacher_offset < 0 or k <= 0 or length < 2:
        return ids, lps, mask
    flat_ids = np.asarray(topk_ids, np.int64)
    n = len(flat_ids) // k
    # Teacher token j sits at o + j and is predicted from t = o + j - 1; t must hold a label (t <= L - 2).
    j_start = max(0, 1 - teacher_offset)
    j_end = min(n, length - teacher_offset)
    if j_end <= j_start:
        return ids, lps, mask
    t_start = teacher_offset + j_start - 1
    t_end = teacher_offset + j_end - 1
    ids[t_start:t_end, :k] = flat_ids.reshape(n, k)[j_start:j_end]
    lps[t_start:t_end, :k] = np.asarray(topk_logprobs, np.float32).reshape(n, k)[j_start:j_end]
    mask[t_start:t_end] = True
    return ids, lps, mask


def _row_teacher(batch: Mapping[str, Sequence], r: int, length: int, width: int, settings: CollateSettings):
    """Row ``r``'s teacher at its student positions: same-tokenizer offset, cross-tokenizer alignment or none."""
    offset, k = int(batch["teacher_offset"][r]), int(batch["topk_k"][r])
    align = batch["teacher_align"][r] if "teacher_align" in batch else None
    if offset >= 0 or align is None or not len(align):
        return aligned_teacher(length, offset, k, width, batch["topk_ids"][r], batch["topk_logprobs"][r])
    ids = batch["topk_ids"][r]
    if settings.xtok_map and k > 0:
        if settings.vocab_map is None:
            raise ValueError("a cross-tokenizer row needs the teacher -> student vocabulary map "
                             "(CollateSettings.vocab_map), and none was given")
        ids = map_ids(settings.vocab_map, ids)
    return aligned_teacher_xtok(length, int(batch["prompt_len"][r]), align, k, width, ids,
                                batch["topk_logprobs"][r], merge=settings.xtok_map)


def _num_rows(batch: Mapping[str, Sequence]) -> int:
    return len(batch["input_ids"])


def _segments(batch: Mapping[str, Sequence], settings: CollateSettings) -> tuple[list[_Segment], int]:
    rows = _num_rows(batch)
    with_teacher = settings.with_teacher and "topk_k" in batch
    width = max((int(k) for k in batch["topk_k"]), default=0) if with_teacher else 0
    # At least one column so the loss sees a [B, T, k>=1] tensor even when no row has top-k.
    width = max(width, 1)
    segments = []
    for r in range(rows):
        ids = np.asarray(batch["input_ids"][r], np.int64)[: settings.max_seq_len]
        labels = shifted_labels(ids, int(batch["prompt_len"][r]))
        if with_teacher:
            t_ids, t_lps, t_mask = _row_teacher(batch, r, len(ids), width, settings)
        else:
            t_ids = t_lps = None
            t_mask = np.zeros(len(ids), bool)
        segments.append(_Segment(ids, labels, t_ids, t_lps, t_mask))
    return segments, width


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of row indices, first-fit decreasing; every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"row {i} has {lengths[i]} tokens > capacity {capacity}")
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def collate(batch: Mapping[str, Sequence], settings: CollateSettings) -> dict[str, torch.Tensor]:
    """Columns of B samples -> model inputs, shifted labels and the aligned teacher.

    Returns ``input_ids`` ``[R, T]`` long, ``labels`` ``[R, T]`` long (shifted, -100 ignored),
    ``attention_mask`` ``[R, T]`` (padding) or, when packing, ``position_ids`` ``[R, T]``;
    with the teacher: ``teacher_ids`` / ``teacher_logprobs`` ``[R, T, k]`` and ``teacher_mask``
    ``[R, T]`` bool; ``num_tokens`` (0-dim) counts real (non-pad) tokens. R = B without packing.
    """
    segments, width = _segments(batch, settings)
    if not segments:
        raise ValueError("empty batch")
    if settings.packing:
        groups = pack_first_fit([len(s) for s in segments], settings.max_seq_len)
    else:
        groups = [[i] for i in range(len(segments))]
    rows = len(groups)
    seq = max(sum(len(segments[i]) for i in g) for g in groups)
    input_ids = np.full((rows, seq), settings.pad_id, np.int64)
    labels = np.full((rows, seq), IGNORE_INDEX, np.int64)
    attention = np.zeros((rows, seq), np.int64)
    positions = np.zeros((rows, seq), np.int64)
    with_teacher = segments[0].teacher_ids is not None
    if with_teacher:
        t_ids = np.full((rows, seq, width), NO_TOKEN, np.int64)
        t_lps = np.zeros((rows, seq, width), np.float32)
    t_mask = np.zeros((rows, seq), bool)
    for r, group in enumerate(groups):
        at = 0
        for i in group:
            s = segments[i]
            end = at + len(s)
            input_ids[r, at:end] = s.ids
            labels[r, at:end] = s.labels
            attention[r, at:end] = 1
            positions[r, at:end] = np.arange(len(s))
            t_mask[r, at:end] = s.teacher_mask
            if with_teacher:
                t_ids[r, at:end] = s.teacher_ids
                t_lps[r, at:end] = s.teacher_logprobs
            at = end
        # Padding restarts at 0 too: its own segment, so real tokens never attend to it.
        positions[r, at:] = np.arange(seq - at)
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "num_tokens": torch.tensor(int(attention.sum())),
    }
    if settings.packing:
        out["position_ids"] = torch.from_numpy(positions)
    else:
        out["attention_mask"] = torch.from_numpy(attention)
    if with_teacher:
        out.update(teacher_ids=torch.from_numpy(t_ids), teacher_logprobs=torch.from_numpy(t_lps),
                   teacher_mask=torch.from_numpy(t_mask))
    return out


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments for the HF model's forward."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
