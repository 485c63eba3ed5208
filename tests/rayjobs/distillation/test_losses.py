"""rayjobs.distillation.losses against naive references written with explicit probabilities and sums."""

import dataclasses

import pytest
import torch

from rayjobs.distillation.losses import (
    DIVERGENCES,
    DenseTeacher,
    LossSettings,
    TopKTeacher,
    distill_loss,
)

B, T, V, K = 2, 5, 11, 4
ALL = sorted(DIVERGENCES)


def _gen(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    teacher = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = -100
    labels[1, 4] = -100
    return student, teacher, labels


def _topk(teacher_logits, k, pad=None):
    """Top-k as vLLM stores it; ``pad`` maps (b, t) -> number of trailing slots set to -1."""
    logprobs = torch.log_softmax(teacher_logits, -1)
    values, ids = logprobs.topk(k, dim=-1)
    for (b, t), n in (pad or {}).items():
        ids[b, t, k - n :] = -1
        values[b, t, k - n :] = float("nan")
    return ids, values


# Naive reference: probabilities, Python loops over positions, explicit sums.


def _probs(logits):
    e = torch.exp(logits - logits.max())
    return e / e.sum()


def _kl(a, b):
    return sum(a[i] * (torch.log(a[i]) - torch.log(b[i])) for i in range(len(a)) if a[i] > 0)


def _ref_div(name, p, q, beta=0.5, lam=0.1):
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "skew_kl":
        return _kl(p, lam * p + (1 - lam) * q)
    if name == "skew_reverse_kl":
        return _kl(q, lam * q + (1 - lam) * p)
    if beta == 0:
        return _kl(p, q)
    if beta == 1:
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _temper(probs, temp):
    w = probs ** (1.0 / temp)
    return w / w.sum()


def _ref_pair(s, t, ids, mode, temp):
    """Teacher and student distributions at one position, built the naive way for each mode."""
    if mode == "dense":
        return _probs(t / temp), _probs(s / temp)
    keep = [int(i) for i in ids if i >= 0]
    p, q = _probs(t)[keep], _probs(s)[keep]
    if mode == "bucket":
        p = torch.cat([p, (1 - p.sum()).reshape(1)])
        q = torch.cat([q, (1 - q.sum()).reshape(1)])
    return _temper(p, temp), _temper(q, temp)


def _ref_loss(student, teacher, labels, mode, cfg, mask=None, ids=None):
    ce_terms, kd_terms = [], []
    for b in range(B):
        for t in range(T):
            if labels[b, t] == -100:
                continue
            ce_terms.append(-torch.log(_probs(student[b, t])[labels[b, t]]))
            if mask is not None and not mask[b, t]:
                continue
            if ids is not None and (ids[b, t] < 0).all():
                continue
            p, q = _ref_pair(student[b, t], teacher[b, t], None if ids is None else ids[b, t], mode, cfg.temperature)
            kd_terms.append(_ref_div(cfg.divergence, p, q, cfg.beta, cfg.lam))
    ce = sum(ce_terms) / len(ce_terms)
    kd = cfg.temperature**2 * sum(kd_terms) / len(kd_terms)
    return (1 - cfg.alpha) * ce + cfg.alpha * kd, ce, kd


def _run(student, teacher_logits, labels, mode, cfg, k=K, pad=None, mask=None):
    if mode == "dense":
        teacher = DenseTeacher(teacher_logits, mask)
    else:
        teacher = TopKTeacher(*_topk(teacher_logits, k, pad), mask)
        cfg = dataclasses.replace(cfg, tail=mode)
    return distill_loss(student, labels, teacher, cfg)


@pytest.mark.parametrize("mode", ["dense", "renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ALL)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_naive_reference(mode, divergence, temperature):
    student, teacher, labels = _gen()
    cfg = LossSettings(kind="logit", divergence=divergence, temperature=temperature, alpha=0.3, beta=0.3, lam=0.2)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 2] = mask[1, 1] = 0
    pad = {(0, 3): 2, (1, 2): K}
    out = _run(student, teacher, labels, mode, cfg, pad=pad, mask=mask)
    ids = None if mode == "dense" else _topk(teacher, K, pad)[0]
    total, ce, kd = _ref_loss(student, teacher, labels, mode, cfg, mask=mask, ids=ids)
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.kd, kd)
    torch.testing.assert_close(out.total, total)
    assert int(out.num_tokens) == 8
    assert int(out.num_kd_tokens) == 8 - 2 - (0 if mode == "dense" else 1)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_of_full_vocab_equals_dense(tail, divergence, dtype):
    student, teacher, labels = _gen(1, dtype)
    cfg = LossSettings(kind="logit", divergence=divergence, temperature=1.7, alpha=0.6, tail=tail)
    dense = distill_loss(student, labels, DenseTeacher(teacher), cfg)
    topk = distill_loss(student, labels, TopKTeacher(*_topk(teacher, V)), cfg)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(topk.kd, dense.kd, **tol)


def test_ce_equals_torch_cross_entropy_and_data_kind_ignores_kd():
    student, teacher, labels = _gen(2)
    out = distill_loss(student, labels, TopKTeacher(*_topk(teacher, K)), LossSettings(kind="data"))
    expected = torch.nn.functional.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.total, expected)
    assert out.kd.item() == 0.0 and int(out.num_kd_tokens) == 0


@pytest.mark.parametrize("mode", ["dense", "renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ALL)
def test_gradcheck(mode, divergence):
    student, teacher, labels = _gen(3)
    student = student[:1, :2, :5].clone().requires_grad_(True)
    teacher, labels = teacher[:1, :2, :5], labels[:1, :2].clamp(max=4)
    cfg = LossSettings(kind="logit", divergence=divergence, temperature=1.5, alpha=0.7, beta=0.4, lam=0.2)

    def total(s):
        return _run(s, teacher, labels, mode, cfg, k=3, pad={(0, 1): 1}).total

    assert torch.autograd.gradcheck(total, student, fast_mode=True)


def test_gradients_match_reference_autograd():
    student, teacher, labels = _gen(4)
    cfg = LossSettings(kind="logit", divergence="jsd", temperature=2.0, alpha=1.0, beta=0.3, tail="bucket")
    s1 = student.clone().requires_grad_(True)
    _run(s1, teacher, labels, "bucket", cfg).total.backward()
    s2 = student.clone().requires_grad_(True)
    ids = _topk(teacher, K)[0]
    total, _, _ = _ref_loss(s2, teacher, labels, "bucket", cfg, ids=ids)
    total.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("mode", ["dense", "renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ALL)
def test_zero_on_identical_distributions(mode, divergence):
    student, _, labels = _gen(5)
    cfg = LossSettings(kind="logit", divergence=divergence, temperature=2.5, alpha=1.0, beta=0.3, lam=0.2)
    out = _run(student, student, labels, mode, cfg, pad={(0, 1): 3})
    assert abs(out.kd.item()) < 1e-12


@pytest.mark.parametrize("divergence", ALL)
def test_bucket_penalizes_mass_leaked_outside_topk_and_renormalize_does_not(divergence):
    _, teacher, labels = _gen(11)
    ids, logprobs = _topk(teacher, K)
    # Same logits as the teacher on its top-k, every other logit raised: same shape inside S.
    leaky = (teacher + 3.0).scatter(-1, ids, teacher.gather(-1, ids))
    settings = dict(kind="logit", divergence=divergence, alpha=1.0, temperature=2.0)
    renorm = distill_loss(leaky, labels, TopKTeacher(ids, logprobs), LossSettings(**settings, tail="renormalize"))
    bucket = distill_loss(leaky, labels, TopKTeacher(ids, logprobs), LossSettings(**settings, tail="bucket"))
    assert abs(renorm.kd.item()) < 1e-12
    assert bucket.kd.item() > 1e-2


def test_jsd_symmetric_at_half_and_endpoints_are_the_kl_directions():
    student, teacher, labels = _gen(6)

    def kd(divergence, s=student, t=teacher, **kw):
        cfg = LossSettings(kind="logit", divergence=divergence, alpha=1.0, **kw)
        return distill_loss(s, labels, DenseTeacher(t), cfg).kd

    torch.testing.assert_close(kd("jsd", beta=0.5), kd("jsd", s=teacher, t=student, beta=0.5))
    assert kd("jsd", beta=0.3) != kd("jsd", s=teacher, t=student, beta=0.3)
    torch.testing.assert_close(kd("jsd", beta=0.0), kd("forward_kl"))
    torch.testing.assert_close(kd("jsd", beta=1.0), kd("reverse_kl"))
    torch.testing.assert_close(kd("skew_kl", lam=0.0), kd("forward_kl"))
    torch.testing.assert_close(kd("skew_reverse_kl", lam=0.0), kd("reverse_kl"))
    # The mixture formula tends to each endpoint's direction once divided by its weight.
    torch.testing.assert_close(kd("jsd", beta=1e-7) / 1e-7, kd("forward_kl"), rtol=1e-5, atol=0)
    torch.testing.assert_close(kd("jsd", beta=1 - 1e-7) / 1e-7, kd("reverse_kl"), rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["dense", "renormalize", "bucket"])
def test_kd_term_scales_with_temperature_squared(mode):
    student, teacher, labels = _gen(7)
    cfg = LossSettings(kind="logit", divergence="forward_kl", temperature=3.0, alpha=1.0)
    out = _run(student, teacher, labels, mode, cfg)
    ids = None if mode == "dense" else _topk(teacher, K)[0]
    unscaled = [
        _ref_div("forward_kl", *_ref_pair(student[b, t], teacher[b, t], None if ids is None else ids[b, t], mode, 3.0))
        for b in range(B)
        for t in range(T)
        if labels[b, t] != -100
    ]
    torch.testing.assert_close(out.kd / (sum(unscaled) / len(unscaled)), torch.tensor(9.0, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["dense", "renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ALL)
def test_masked_positions_change_nothing(mode, divergence):
    student, teacher, labels = _gen(8)
    cfg = LossSettings(kind="logit", divergence=divergence, temperature=2.0, alpha=0.5, beta=0.3)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3] = False
    labels[0, 2] = -100
    s1 = student.clone().requires_grad_(True)
    out1 = _run(s1, teacher, labels, mode, cfg, mask=mask)
    out1.total.backward()

    garbage_student, garbage_teacher = student.clone(), teacher.clone()
    garbage_student[0, 2] = 1e4
    garbage_teacher[0, 2] = float("nan")
    garbage_teacher[1, 3] = float("nan")
    s2 = garbage_student.requires_grad_(True)
    out2 = _run(s2, garbage_teacher, labels, mode, cfg, mask=mask)
    out2.total.backward()
    torch.testing.assert_close(out2.total, out1.total)
    assert s2.grad[0, 2].abs().max() == 0
    torch.testing.assert_close(s2.grad, s1.grad)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ALL)
def test_padding_ids_and_empty_batches_give_finite_gradients(tail, divergence):
    student, teacher, labels = _gen(9, torch.float32)
    ids, logprobs = _topk(teacher, K, pad={(b, t): K for b in range(B) for t in range(T) if (b + t) % 2})
    ids[0, 0, 1:] = -1
    cfg = LossSettings(kind="logit", divergence=divergence, temperature=2.0, alpha=1.0, tail=tail)
    for lab in (labels, torch.full_like(labels, -100)):
        s = student.clone().requires_grad_(True)
        out = distill_loss(s, lab, TopKTeacher(ids, logprobs), cfg)
        out.total.backward()
        assert torch.isfinite(out.total) and torch.isfinite(s.grad).all()
    assert out.total.item() == 0.0 and s.grad.abs().max() == 0


@pytest.mark.parametrize("divergence", ALL)
def test_bucket_stays_finite_when_teacher_tail_rounds_to_zero(divergence):
    student, teacher, labels = _gen(12, torch.float32)
    teacher[..., 0] = 60.0
    s = student.clone().requires_grad_(True)
    cfg = LossSettings(kind="logit", divergence=divergence, alpha=1.0, temperature=2.0, beta=1.0, tail="bucket")
    out = distill_loss(s, labels, TopKTeacher(*_topk(teacher, K)), cfg)
    out.total.backward()
    assert torch.isfinite(out.total) and out.total.item() > 0 and torch.isfinite(s.grad).all()


def test_low_precision_logits_are_upcast():
    student, teacher, labels = _gen(10, torch.bfloat16)
    cfg = LossSettings(kind="logit", divergence="jsd", alpha=0.5)
    out = distill_loss(student, labels, TopKTeacher(*_topk(teacher.float(), K)), cfg)
    ref = distill_loss(student.float(), labels, TopKTeacher(*_topk(teacher.float(), K)), cfg)
    assert out.total.dtype == torch.float32
    torch.testing.assert_close(out.total, ref.total)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="divergence"):
        LossSettings(divergence="kl")
    with pytest.raises(ValueError, match="tail"):
        LossSettings(tail="drop")
    with pytest.raises(ValueError, match="temperature"):
        LossSettings(temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        LossSettings(beta=1.5)
    with pytest.raises(ValueError, match="kind"):
        LossSettings(kind="feature")
    student, _, labels = _gen()
    with pytest.raises(ValueError, match="teacher"):
        distill_loss(student, labels, None, LossSettings(kind="logit"))
