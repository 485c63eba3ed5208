"""Contrastive auxiliary loss: the student's pooled representation of a sample should pick out
the teacher's representation of the same sample among the batch's others (CRD-style InfoNCE).

Pure torch (no engine import). Per sample, both models' hidden states at one chosen layer are
mean-pooled over the aligned positions (``align_index >= 0``: the same text in both tokenizers),
the student's through a learned linear projection when the widths differ (``ContrastiveHead``,
trained with the student inside ``DistillModule`` and dropped at merge). With ``s_i``, ``t_j`` the
L2-normalized pooled vectors and ``tau`` the temperature::

    loss = mean_i  -log( exp(s_i . t_i / tau) / sum_j exp(s_i . t_j / tau) )

the teacher's vector of the same sample is the positive, the other samples' in the micro-batch the
negatives (negatives are not gathered across ranks; a micro-batch of one sample gives loss 0).
Unlike the per-position feature losses it asks only that the student keep samples apart the way the
teacher does, which tolerates a student too small to copy the teacher's features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rayjobs.distillation.xtok import gather_positions


class ContrastiveHead(nn.Module):
    """Student width -> teacher width (identity, no parameters, when they are equal)."""

    def __init__(self, student_width: int, teacher_width: int):
        super().__init__()
        self.proj = nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled)


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` -> ``[B, H]``: mean over the positions where ``mask`` ``[B, T]`` is true."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def info_nce(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over ``[B, D]`` pairs: row ``i`` of ``teacher`` is ``student[i]``'s positive."""
    s = nn.functional.normalize(student.float(), dim=-1)
    t = nn.functional.normalize(teacher.float(), dim=-1)
    logits = s @ t.T / temperature
    return nn.functional.cross_entropy(logits, torch.arange(len(s), device=s.device))


def contrastive_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, align_index: torch.Tensor,
                     head: ContrastiveHead, temperature: float) -> torch.Tensor:
    """InfoNCE of the pooled student (``[B, T_s, H_s]``) against the pooled teacher (``[B, T_t, H_t]``)
    over the aligned positions; the teacher's states are gathered onto the student's grid first."""
    aligned = align_index >= 0
    student = head(masked_mean_pool(student_hidden.float(), aligned))
    teacher = masked_mean_pool(gather_positions(teacher_hidden.float(), align_index), aligned)
    return info_nce(student, teacher.detach(), temperature)


@dataclass(frozen=True)
class WithContrastive:
    """A loss output (``LossOutput`` or ``FeatureLossOutput``) with the weighted contrastive term added
    to ``total``; every other term reads through to ``base``."""

    base: object
    total: torch.Tensor
    contrastive: torch.Tensor

    def __getattr__(self, name: str):
        return getattr(self.base, name)
