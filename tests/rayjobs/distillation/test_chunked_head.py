"""rayjobs.distillation.chunked_head against the unchunked head + loss (``losses.distill_loss``,
``xtok.uld_loss``), which test_losses.py checks against explicit sums.

Loss, hidden-state gradient and head-weight gradient must agree to a relative error of 1e-5 in
fp32 for every divergence, both tails, dense and ULD KD, at V = 17, 1,000 and 151,936 (few tokens
there, to stay fast); and no tensor larger than one chunk of logits may exist on the way.
"""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rayjobs.distillation.chunked_head import DenseTeacherHead, call_head, head_loss, output_head
from rayjobs.distillation.losses import DIVERGENCES, DenseTeacher, LossSettings, TopKTeacher, distill_loss
from rayjobs.distillation.xtok import map_teacher_topk, uld_loss, uld_term

H, K = 8, 5
VOCABS = (17, 1000, 151_936)
TEACHERS = [("topk", tail, d) for tail in ("bucket", "renormalize") for d in sorted(DIVERGENCES)]
TEACHERS += [("dense", "bucket", d) for d in sorted(DIVERGENCES)]
TEACHERS += [("vocab_map", "bucket", "forward_kl"), ("vocab_map", "renormalize", "jsd"), ("uld", "bucket", None),
             ("data", "bucket", None)]


@dataclasses.dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor


def _case(vocab: int, batch: int = 2, seq: int = 7, dtype=torch.float32, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :2] = -100  # prompt
    labels[-1, -1] = -100  # padding
    return Case(torch.randn(batch, seq, H, generator=g).to(dtype), torch.randn(vocab, H, generator=g).to(dtype),
                labels, torch.randn(batch, seq, H, generator=g).to(dtype), torch.randn(vocab, H, generator=g).to(dtype))


def _teachers(kind: str, case: Case):
    """(teacher for the unchunked loss, teacher for the chunked one)."""
    mask = torch.ones(case.labels.shape, dtype=torch.bool)
    mask[0, 3] = False
    logits = case.teacher_hidden @ case.teacher_weight.T
    if kind == "dense":
        return DenseTeacher(logits, mask), DenseTeacherHead(case.teacher_hidden, case.teacher_weight, None, mask,
                                                            case.weight.shape[0])
    if kind == "data":
        return None, None
    k = min(K, logits.shape[-1])
    if kind == "vocab_map":  # teacher ids mapped to student ids with collisions and unmapped ids, merged
        vocab = logits.shape[-1]
        to_student = torch.arange(vocab) // 2
        to_student[::3] = -1
        ids, logprobs = map_teacher_topk(logits, to_student, k)
    else:
        logprobs, ids = torch.log_softmax(logits, -1).topk(k, dim=-1)
        ids[-1, 4, k - 2:] = -1  # fewer than k stored at one position
    teacher = TopKTeacher(ids, logprobs, mask)
    return teacher, teacher


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _run(case: Case, kind: str, settings: LossSettings, chunked: bool, chunk_tokens: int = 3):
    hidden = case.hidden.clone().requires_grad_()
    weight = case.weight.clone().requires_grad_()
    reference, teacher = _teachers(kind, case)
    if chunked:
        kd_term = {"kd_term": uld_term} if kind == "uld" else {}
        total, ce, kd, n, n_kd = head_loss(hidden, case.labels, weight, None, teacher, settings, chunk_tokens, **kd_term)
    else:
        loss = uld_loss if kind == "uld" else distill_loss
        out = loss(hidden @ weight.T, case.labels, reference, settings)
        total, ce, kd, n, n_kd = out.total, out.ce, out.kd, out.num_tokens, out.num_kd_tokens
    total.backward()
    return torch.stack([total, ce, kd]).detach(), (n, n_kd), hidden.grad, weight.grad


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("kind,tail,divergence", TEACHERS)
def test_chunked_equals_unchunked(vocab, kind, tail, divergence):
    case = _case(vocab, batch=1, seq=5) if vocab > 1000 else _case(vocab)
    settings = LossSettings(kind="data" if kind == "data" else "logit", divergence=divergence or "forward_kl",
                            tail=tail, temperature=1.7, alpha=0.6)
    losses, counts, d_hidden, d_weight = _run(case, kind, settings, chunked=True)
    ref_losses, ref_counts, ref_hidden, ref_weight = _run(case, kind, settings, chunked=False)
    assert [int(c) for c in counts] == [int(c) for c in ref_counts]
    for got, want in zip(losses, ref_losses, strict=True):
        assert abs(float(got - want)) <= 1e-5 * max(abs(float(want)), 1e-12)
    assert _rel(d_hidden, ref_hidden) <= 1e-5
    assert _rel(d_weight, ref_weight) <= 1e-5
    if kind != "data":
        assert losses[2] > 0


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["topk", "dense", "uld"])
def test_no_tensor_larger_than_one_chunk_of_logits(kind):
    vocab, chunk = 1000, 8
    case = _case(vocab, batch=4, seq=16)
    _, teacher = _teachers(kind, case)
    hidden, weight = case.hidden.clone().requires_grad_(), case.weight.clone().requires_grad_()
    with _LargestTensor() as seen:
        total = head_loss(hidden, case.labels, weight, None, teacher, LossSettings(kind="logit"), chunk,
                          **({"kd_term": uld_term} if kind == "uld" else {}))[0]
        total.backward()
    # One chunk's logits, as large as the head weight and its gradient (V x H = 8,000); the whole
    # batch's would be 64,000.
    assert seen.largest <= max(chunk * vocab, vocab * H)


def test_bias_frozen_weight_and_incoming_gradient():
    case = _case(1000)
    bias = torch.randn(1000)
    settings = LossSettings(kind="logit")
    _, teacher = _teachers("topk", case)
    hidden = case.hidden.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    (3.0 * head_loss(hidden, case.labels, case.weight, b, teacher, settings, 4)[0]).backward()
    ref_hidden, ref_b = case.hidden.clone().requires_grad_(), bias.clone().requires_grad_()
    (3.0 * distill_loss(ref_hidden @ case.weight.T + ref_b, case.labels, teacher, settings).total).backward()
    assert _rel(hidden.grad, ref_hidden.grad) <= 1e-5 and _rel(b.grad, ref_b.grad) <= 1e-5
    # Positions without a label get exactly zero gradient.
    assert (hidden.grad[case.labels == -100] == 0).all()


def test_without_gradients_the_values_are_the_same():
    case = _case(1000)
    _, teacher = _teachers("dense", case)
    settings = LossSettings(kind="logit", divergence="jsd")
    with_grad = head_loss(case.hidden.requires_grad_(), case.labels, case.weight, None, teacher, settings, 5)
    with torch.inference_mode():
        without = head_loss(case.hidden, case.labels, case.weight, None, teacher, settings, 5)
    for a, b in zip(with_grad, without, strict=True):
        torch.testing.assert_close(a.detach(), b)


def test_no_labelled_token():
    case = _case(17)
    labels = torch.full_like(case.labels, -100)
    hidden, weight = case.hidden.clone().requires_grad_(), case.weight.clone().requires_grad_()
    total, ce, kd, n, n_kd = head_loss(hidden, labels, weight, None, None, LossSettings(), 4)
    total.backward()
    assert total.item() == 0.0 and int(n) == 0 and not hidden.grad.any() and not weight.grad.any()


def test_bf16_is_as_close_as_bf16_allows():
    """Weight gradients accumulate in bf16 across chunks (as Liger's): close, not equal."""
    case = _case(1000, batch=4, seq=32, dtype=torch.bfloat16)
    settings = LossSettings(kind="logit")
    _, teacher = _teachers("topk", case)
    losses, _, d_hidden, d_weight = _run(case, "topk", settings, chunked=True, chunk_tokens=16)
    ref_losses, _, ref_hidden, ref_weight = _run(case, "topk", settings, chunked=False)
    assert d_weight.dtype == torch.bfloat16
    torch.testing.assert_close(losses, ref_losses, rtol=1e-3, atol=1e-3)
    assert _rel(d_hidden, ref_hidden) < 1e-2 and _rel(d_weight, ref_weight) < 1e-2


def test_call_head_runs_the_loss_as_the_head_modules_forward():
    case = _case(1000)
    head = torch.nn.Linear(H, 1000, bias=False)
    calls = []
    head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    out = call_head(head, case.hidden, case.labels, None, LossSettings(), 4)
    ref = distill_loss(head(case.hidden), case.labels)
    assert calls[0] == case.hidden.shape  # hooks see the hidden states, as ZeRO-3's do
    assert "forward" not in head.__dict__  # the module's own forward is back
    torch.testing.assert_close(out.total, ref.total)
    assert int(out.num_tokens) == int(ref.num_tokens)


def test_output_head_through_peft_and_the_feature_wrapper():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayjobs.distillation.feature_losses import DistillModule, FeatureProjector

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))

    plain = model()
    assert output_head(plain) is plain.lm_head
    assert output_head(DistillModule(plain, FeatureProjector(16, 8, 1))) is plain.lm_head
    saved = get_peft_model(model(), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM",
                                               modules_to_save=["embed_tokens"], ensure_weight_tying=True))
    head = output_head(saved)
    assert isinstance(head, torch.nn.Linear) and head.weight.requires_grad  # the trained copy, tied
    assert head.weight is saved.get_input_embeddings().modules_to_save["default"].weight
    adapted = get_peft_model(model(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="no LoRA adapters on lm_head"):
        output_head(adapted)


def test_chunk_size_defaults_to_a_logit_budget_and_config_refuses_lora_on_the_head():
    from pydantic import ValidationError

    from rayjobs.distillation.chunked_head import chunk_size
    from rayjobs.distillation.config import DistillationConfig

    assert chunk_size(None, 151_936) == 110 and chunk_size(None, 384) == 43_690 and chunk_size(7, 151_936) == 7
    assert chunk_size(None, 151_936, compact=True) == 441 and chunk_size(7, 151_936, compact=True) == 7
    cfg = DistillationConfig.model_validate({"student": "s", "output": "o"})
    assert cfg.loss.chunk_tokens is None
    with pytest.raises(ValidationError, match="LoRA adapters on lm_head"):
        DistillationConfig.model_validate({"student": "s", "output": "o",
                                           "lora": {"enabled": True, "target_modules": ["q_proj", "lm_head"]}})
    with pytest.raises(ValidationError):
        DistillationConfig.model_validate({"student": "s", "output": "o", "loss": {"chunk_tokens": 0}})
