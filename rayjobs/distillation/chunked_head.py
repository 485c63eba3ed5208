"""The student's LM head and every loss that reads its logits, a chunk of tokens at a time.

Why: a real vocabulary makes the logits the largest tensor of a step. At V = 151,936 (Qwen2.5)
one 512-token micro-batch of top-k KD grew peak memory by 1.4 GiB through the unchunked loss
(bf16 logits, their fp32 upcast, log-softmax and the gradients of each, all alive at once), about
2.8 MB per token: an 8k-token reasoning trace would need ~22 GB for the loss alone. Here at most
one chunk of ``chunk_tokens x V`` logits exists at a time, so the loss path's memory no longer
grows with the tokens beyond the hidden states.

How (Liger Kernel's fused linear cross-entropy, in plain torch so it runs on CPU and GPU alike):
``head_loss`` takes the final hidden states, keeps the positions that have a label (the others
add nothing to any term) and hands them to ``_ChunkedHeadLoss``. For each chunk it computes the
logits, the per-position terms of ``losses.token_terms`` (the very function the unchunked
``distill_loss`` uses, so every divergence, tail, temperature and ULD has one definition) reduced
with the whole batch's token counts (``losses.reduce_terms``), and asks autograd for the gradient
of that chunk's loss with respect to its logits alone. The chunk's hidden-state gradient
(``g @ W``) and its share of the head gradient (``g^T h``) are computed right away and the logits
dropped. The backward pass only scales the stored gradients by the incoming one: nothing is
recomputed, and the FLOPs are those of the unchunked path. Cross-entropy and stored top-k KD skip
autograd over the vocabulary altogether (``_compact_chunk``), which made their chunked step faster
than the unchunked one (``bench/vocab_memory.py``).

Teachers: a stored top-k teacher is sliced per chunk; the online teacher's full logits are made
per chunk from its hidden states and head (``DenseTeacherHead``); a cross-vocabulary online
teacher's top-k is reduced chunk by chunk as well (``chunked_rows``).

DeepSpeed: ``call_head`` runs ``head_loss`` *as the head module's forward*, so ZeRO-3's hooks on
that module gather its (possibly partitioned) weight for the forward and again in the backward,
where the weight's gradient arrives: a ``[V, H]`` gradient returned for a parameter that is
partitioned at that moment is refused by autograd. ZeRO 0-2 and plain modules take the same path.
Weight gradients accumulate in the weight's dtype across chunks, as Liger's do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from rayjobs.distillation.losses import (
    IGNORE_INDEX,
    DenseTeacher,
    KdTerm,
    LossOutput,
    LossSettings,
    TokenTerms,
    TopKTeacher,
    divergence_term,
    kd_positions,
    reduce_terms,
    token_terms,
)


# Logits per chunk when ``chunk_tokens`` is not set, sized to about the same working set (~300 MiB)
# on both paths: autograd over the chunk's fp32 logits holds ~18 bytes per logit at its peak (the
# logits, logsumexp's and the gathers' gradients, their sum, temporaries): 2**24 logits, 110 tokens
# at V = 151,936. The compact path (``_compact_chunk``: cross-entropy and stored top-k KD) holds one
# fp32 buffer and the head-dtype logits and gradient, ~6 bytes per logit: 2**26 logits, 441 tokens,
# whose fewer, larger GEMMs run faster. Small vocabularies get the whole micro-batch in one chunk.
CHUNK_LOGITS = 2**24
COMPACT_CHUNK_LOGITS = 2**26


def chunk_size(chunk_tokens: int | None, vocab: int, compact: bool = False) -> int:
    """Tokens per chunk: ``chunk_tokens`` as configured, else sized from the vocabulary and the path."""
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        return chunk_tokens
    return max(1, (COMPACT_CHUNK_LOGITS if compact else CHUNK_LOGITS) // vocab)


def no_logits(device) -> torch.Tensor:
    """``logits_to_keep`` for an HF causal LM whose head we run ourselves: no position."""
    return torch.zeros(0, dtype=torch.long, device=device)


def fit_vocab(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Same tokenizer, differently padded embedding rows: cut or pad the teacher's logits to ``width``.

    Rows past the tokenizer are never produced by either model; padding gets the dtype's lowest
    finite value (zero mass without ``-inf`` arithmetic).
    """
    if logits.shape[-1] >= width:
        return logits[..., :width]
    pad = logits.new_full((*logits.shape[:-1], width - logits.shape[-1]), torch.finfo(logits.dtype).min)
    return torch.cat([logits, pad], dim=-1)


@dataclass(frozen=True)
class DenseTeacherHead:
    """The online teacher's full distribution, made a chunk at a time from its last hidden states.

    hidden: ``[..., H_t]`` teacher states on the student's positions; weight ``[V_t, H_t]`` and bias:
    its head (gathered by the caller under ZeRO-3); mask: positions with a teacher; width: the
    student's vocabulary (``fit_vocab``).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    mask: torch.Tensor | None
    width: int

    def chunk(self, start: int, end: int) -> DenseTeacher:
        logits = fit_vocab(F.linear(self.hidden[start:end], self.weight, self.bias), self.width)
        return DenseTeacher(logits, None if self.mask is None else self.mask[start:end])


Teacher = TopKTeacher | DenseTeacherHead | None


def _flat(t: torch.Tensor | None, rows: torch.Tensor, trailing: int) -> torch.Tensor | None:
    """``t``'s positions flattened and ``rows`` picked; ``trailing`` dims after the positions."""
    if t is None:
        return None
    return t.reshape(-1, *t.shape[t.dim() - trailing:]).index_select(0, rows)


def _teacher_rows(teacher: Teacher, rows: torch.Tensor) -> Teacher:
    if isinstance(teacher, TopKTeacher):
        return TopKTeacher(_flat(teacher.ids, rows, 1), _flat(teacher.logprobs, rows, 1), _flat(teacher.mask, rows, 0))
    if isinstance(teacher, DenseTeacherHead):
        return replace(teacher, hidden=_flat(teacher.hidden, rows, 1), mask=_flat(teacher.mask, rows, 0))
    return None


def _teacher_chunk(teacher: Teacher, start: int, end: int) -> TopKTeacher | DenseTeacher | None:
    if isinstance(teacher, TopKTeacher):
        mask = None if teacher.mask is None else teacher.mask[start:end]
        return TopKTeacher(teacher.ids[start:end], teacher.logprobs[start:end], mask)
    if isinstance(teacher, DenseTeacherHead):
        return teacher.chunk(start, end)
    return None


@dataclass(frozen=True)
class _Job:
    """Everything but the head's inputs: labelled positions only, flattened; the batch's counts."""

    labels: torch.Tensor
    teacher: Teacher
    settings: LossSettings
    kd_term: KdTerm
    chunk_tokens: int
    num_tokens: torch.Tensor
    num_kd_tokens: torch.Tensor

    def chunk_loss(self, logits: torch.Tensor, start: int, end: int) -> LossOutput:
        return self.reduce(token_terms(logits, self.labels[start:end], _teacher_chunk(self.teacher, start, end),
                                       self.settings, self.kd_term))

    def reduce(self, terms: TokenTerms) -> LossOutput:
        """A chunk's terms as its share of the batch's loss (the batch's token counts)."""
        return reduce_terms(terms, self.settings, self.num_tokens, self.num_kd_tokens)

    @property
    def sparse(self) -> bool:
        """Whether the loss reads the logits only through their logsumexp and a few gathered columns
        (cross-entropy, and a divergence over stored top-k): then ``_compact_chunk`` applies."""
        return self.settings.kind == "data" or (
            self.kd_term is divergence_term and isinstance(self.teacher, TopKTeacher))


def _compact_chunk(logits: torch.Tensor, job: _Job, start: int, grad_out: torch.Tensor | None) -> LossOutput:
    """``job.chunk_loss`` for a sparse loss (``_Job.sparse``) without autograd over the vocabulary.

    Such a loss depends on the ``[C, V]`` logits only through each row's logsumexp and the columns
    of its label and teacher ids. Those ``[C, 1 + k]`` values and the logsumexp become the leaves of
    ``token_terms`` (the label remapped to column 0, teacher id ``j`` to column ``1 + j``), so
    autograd runs on ``[C, 1 + k]``. The vocabulary-wide gradient is then written in place into
    ``logits``: ``softmax * dL/dlse`` plus the gathered columns' gradients, about 9 passes over the
    chunk instead of autograd's ~16 (logsumexp's and two gathers' backward, their sum, temporaries).
    ``logits`` (the compute dtype) is overwritten.
    """
    end = start + logits.shape[0]
    labels = job.labels[start:end]
    teacher = _teacher_chunk(job.teacher, start, end) if job.settings.kind == "logit" else None
    has_label = labels != IGNORE_INDEX
    columns = [torch.where(has_label, labels, 0)[:, None]]
    if teacher is not None:
        columns.append(torch.where(teacher.ids >= 0, teacher.ids, 0))
        slots = torch.arange(1, teacher.ids.shape[-1] + 1, device=logits.device)
        teacher = TopKTeacher(torch.where(teacher.ids >= 0, slots, -1), teacher.logprobs, teacher.mask)
    index = torch.cat(columns, dim=-1)
    need_grad = grad_out is not None
    picked = logits.gather(-1, index).requires_grad_(need_grad)
    lse = torch.logsumexp(logits, dim=-1).requires_grad_(need_grad)
    with torch.set_grad_enabled(need_grad):
        terms = token_terms(picked, torch.where(has_label, 0, IGNORE_INDEX), teacher, job.settings, job.kd_term, lse)
        out = job.reduce(terms)
    if need_grad:
        d_picked, d_lse = torch.autograd.grad(out.total, [picked, lse])
        # logsumexp's backward as autograd computes it (exp(logits - lse) * grad), in place.
        logits.sub_(lse.detach()[:, None]).exp_().mul_(d_lse[:, None]).scatter_add_(-1, index, d_picked)
        grad_out.copy_(logits)
    return out


def _chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, job: _Job, start: int,
           grad_out: torch.Tensor | None) -> torch.Tensor:
    """One chunk's ``[total, ce, kd]``; with ``grad_out``, the gradient of its total w.r.t. its logits there.

    A function of its own so the chunk's logits and graph are freed on return, before the next
    chunk's exist. The logits are upcast here, as ``losses.token_terms`` would, so the low-precision
    copy is not kept beside them; the gradient is cast back to the head's dtype as it is written.
    """
    need_grad = grad_out is not None
    logits = F.linear(h, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if job.sparse:
        out = _compact_chunk(logits, job, start, grad_out)
    else:
        logits.requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            out = job.chunk_loss(logits, start, start + h.shape[0])
        if need_grad:
            grad_out.copy_(torch.autograd.grad(out.total, logits)[0])
    return torch.stack([out.total, out.ce, out.kd]).detach()


def _run_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, job: _Job,
                wanted: tuple[bool, bool, bool]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``([total, ce, kd], [d hidden, d weight, d bias])``; a gradient only where ``wanted``."""
    sums = torch.zeros(3, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    grads = [torch.empty_like(hidden) if wanted[0] else None, torch.zeros_like(weight) if wanted[1] else None,
             torch.zeros_like(bias) if wanted[2] else None]
    for start in range(0, hidden.shape[0], job.chunk_tokens):
        h = hidden[start:start + job.chunk_tokens]
        g = hidden.new_empty(h.shape[0], weight.shape[0]) if any(wanted) else None
        sums += _chunk(h, weight, bias, job, start, g)
        if wanted[0]:
            torch.mm(g, weight, out=grads[0][start:start + h.shape[0]])
        if wanted[1]:
            grads[1].addmm_(g.t(), h)
        if wanted[2]:
            grads[2] += g.sum(0)
        del g  # before the next chunk's logits exist
    return sums, grads


class _ChunkedHeadLoss(torch.autograd.Function):
    """``(hidden [M, H], weight [V, H], bias) -> (total, ce, kd)``; gradients made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, job: _Job):
        sums, grads = _run_chunks(hidden, weight, bias, job, tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*grads)
        total, ce, kd = (s.clone() for s in sums.unbind())
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grads = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in ctx.saved_tensors]
        return *grads, None


def head_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher: Teacher,
    settings: LossSettings,
    chunk_tokens: int | None,
    kd_term: KdTerm = divergence_term,
) -> tuple[torch.Tensor, ...]:
    """``LossOutput``'s fields of ``distill_loss(F.linear(hidden, weight, bias), labels, teacher)``.

    hidden: ``[B, T, H]`` final hidden states; labels, teacher: as ``distill_loss`` (a
    ``DenseTeacherHead`` in place of a ``DenseTeacher``); chunk_tokens: see ``chunk_size``. A plain
    tuple of tensors, because that is what ZeRO-3's hooks look into when this runs as a module's
    forward (``call_head``).
    """
    has_label = labels != IGNORE_INDEX
    n = has_label.sum()
    kd_on = settings.kind == "logit" and teacher is not None
    n_kd = kd_positions(labels, teacher).sum() if kd_on else torch.zeros_like(n)
    rows = has_label.reshape(-1).nonzero().squeeze(-1)
    job = _Job(labels.reshape(-1)[rows], _teacher_rows(teacher, rows), settings, kd_term, 1, n, n_kd)
    job = replace(job, chunk_tokens=chunk_size(chunk_tokens, weight.shape[0], job.sparse))
    picked = _flat(hidden, rows, 1)
    inputs = [t for t in (picked, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        total, ce, kd = _ChunkedHeadLoss.apply(picked, weight, bias, job)
    else:
        total, ce, kd = _run_chunks(picked, weight, bias, job, (False, False, False))[0].unbind()
    return total, ce, kd, n, n_kd


def call_head(head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, teacher: Teacher,
              settings: LossSettings, chunk_tokens: int | None, kd_term: KdTerm = divergence_term) -> LossOutput:
    """``head_loss`` with ``head``'s parameters, run through ``head(hidden)`` so that the module's
    hooks (DeepSpeed ZeRO-3's gather and release) fire around it (module docstring)."""

    def forward(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return head_loss(h, labels, head.weight, head.bias, teacher, settings, chunk_tokens, kd_term)

    head.forward = forward
    try:
        return LossOutput(*head(hidden))
    finally:
        del head.forward


def output_head(model: nn.Module) -> nn.Linear:
    """The linear layer that makes ``model``'s logits, through peft's ``modules_to_save`` wrapper.

    A head carrying LoRA adapters is refused: its logits are not ``F.linear(h, weight, bias)``.
    """
    head = model.get_output_embeddings()
    saved = getattr(head, "modules_to_save", None)
    if isinstance(saved, nn.ModuleDict):  # peft's ModulesToSaveWrapper: the copy its forward uses
        active = head.active_adapters
        use_copy = not head.disable_adapters and active and active[0] in saved
        head = saved[active[0]] if use_copy else head.original_module
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the output head is a {type(head).__name__}, not a linear layer: the chunked head "
                         "needs a plain one (no LoRA adapters on lm_head; train it in full with "
                         "lora.modules_to_save instead)")
    return head


def chunked_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk_tokens: int | None,
                 reduce: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """``reduce(logits)`` per chunk of ``hidden``'s positions, the results put back in their shape.

    For a teacher's top-k of its full distribution without holding it: ``hidden [..., H]`` ->
    outputs ``[..., k]``, under ``torch.no_grad`` by the caller.
    """
    chunk_tokens = chunk_size(chunk_tokens, weight.shape[0])
    flat = hidden.reshape(-1, hidden.shape[-1])
    parts = [reduce(F.linear(flat[s:s + chunk_tokens], weight, bias)) for s in range(0, flat.shape[0], chunk_tokens)]
    return tuple(torch.cat(p).reshape(*hidden.shape[:-1], *p[0].shape[1:]) for p in zip(*parts, strict=True))
