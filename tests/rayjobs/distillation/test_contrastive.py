"""Item 6 of #21: the contrastive (InfoNCE) auxiliary loss on pooled hidden states (pure torch)."""

import math

import pytest
import torch

from rayjobs.distillation.contrastive import ContrastiveHead, contrastive_loss, info_nce, masked_mean_pool


def test_contrastive_hand_built_case():
    """Two orthogonal unit pairs, each student equal to its teacher: logits [[1, 0], [0, 1]] / tau."""
    s = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # scale does not matter (cosine)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0)))
    assert info_nce(s, t, tau).item() == pytest.approx(expected, rel=1e-6)
    assert info_nce(s, t.flip(0), tau).item() == pytest.approx(-math.log(1 / (1 + math.exp(2.0))), rel=1e-6)
    assert info_nce(s[:1], t[:1], tau).item() == pytest.approx(0.0, abs=1e-7)  # no negatives, no signal


def test_contrastive_equals_the_reference_formula():
    torch.manual_seed(0)
    s, t, tau = torch.randn(5, 7), torch.randn(5, 7), 0.2
    terms = []
    for i in range(5):
        sims = torch.stack([torch.cosine_similarity(s[i], t[j], dim=0) / tau for j in range(5)])
        terms.append(-(sims[i] - torch.logsumexp(sims, 0)))
    assert info_nce(s, t, tau).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_contrastive_pools_aligned_positions_only_and_projects_between_widths():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, -100.0]]])
    assert torch.equal(masked_mean_pool(hidden, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 2.0]]))
    assert isinstance(ContrastiveHead(8, 8).proj, torch.nn.Identity)
    assert ContrastiveHead(8, 16)(torch.randn(3, 8)).shape == (3, 16)


def test_contrastive_gradient_flows_to_student_and_projection_not_teacher():
    torch.manual_seed(0)
    student = torch.randn(3, 6, 8, requires_grad=True)
    teacher = torch.randn(3, 9, 16, requires_grad=True)
    align = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 2, 4, 6, -1, -1], [1, 2, 3, -1, -1, -1]])
    head = ContrastiveHead(8, 16)
    loss = contrastive_loss(student, teacher, align, head, temperature=0.1)
    loss.backward()
    assert loss.item() > 0 and student.grad.abs().sum() > 0 and head.proj.weight.grad.abs().sum() > 0
    assert teacher.grad is None
    assert student.grad[1, 4:].abs().sum() == 0  # unaligned positions are not pooled


def test_contrastive_config_needs_an_online_teacher_and_adds_a_curve_column():
    from rayjobs.distillation.batch_loss import BatchLoss
    from rayjobs.distillation.config import DistillationConfig

    base = {"student": "s", "output": "o"}
    with pytest.raises(ValueError, match="contrastive needs the teacher's hidden states"):
        DistillationConfig.model_validate({**base, "loss": {"kind": "logit", "contrastive": {"weight": 0.1}}})
    cfg = DistillationConfig.model_validate({**base, "loss": {"kind": "logit", "contrastive": {"weight": 0.1}},
                                             "teacher": {"source": "online"}})
    assert BatchLoss(cfg, 4).terms == ("loss", "ce", "kd", "contrastive")
