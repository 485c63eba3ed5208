"""Feature distillation on tiny real models that differ in width, depth, heads and vocabulary."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rayjobs.distillation.chunked_head import call_head, output_head
from rayjobs.distillation.config import TeacherConfig
from rayjobs.distillation.feature_losses import (
    DistillModule,
    FeatureProjector,
    FeatureSettings,
    attention_map_loss,
    check_layer_map,
    feature_distill_loss,
    hidden_state_loss,
    uniform_layer_map,
)
from rayjobs.distillation.losses import LossSettings
from rayjobs.distillation.online_teacher import OnlineTeacher, load_teacher


def test_uniform_layer_map_spreads_student_blocks_over_the_teacher():
    assert uniform_layer_map(2, 4) == [(1, 2), (2, 4)]
    assert uniform_layer_map(3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert uniform_layer_map(3, 4) == [(1, 1), (2, 3), (3, 4)]
    assert uniform_layer_map(4, 2) == [(1, 1), (2, 1), (3, 2), (4, 2)]


def test_layer_map_errors_name_the_pair():
    assert check_layer_map([[0, 0], [2, 4]], 2, 4) == [(0, 0), (2, 4)]
    with pytest.raises(ValueError, match=r"\[3, 4\] is outside the student's 0..2"):
        check_layer_map([[3, 4]], 2, 4)
    with pytest.raises(ValueError, match="not a"):
        check_layer_map([[1]], 2, 4)


def _identity_projector(width, pairs):
    proj = FeatureProjector(width, width, pairs)
    with torch.no_grad():
        for lin in proj.proj:
            lin.weight.copy_(torch.eye(width))
            lin.bias.zero_()
    return proj


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_is_zero_for_equal_states_and_ignores_unaligned_positions(kind):
    h = [torch.randn(2, 5, 8) for _ in range(3)]
    align = torch.tensor([[0, 1, 2, 3, -1], [0, 1, 2, -1, -1]])
    mask = align >= 0
    settings = FeatureSettings(((1, 1), (2, 2)), hidden_loss=kind)
    assert hidden_state_loss(h, h, align, mask, _identity_projector(8, 2), settings).item() == pytest.approx(0, abs=1e-6)
    noisy = [x.clone() for x in h]
    for x in noisy:
        x[0, 4] = 100.0  # an unaligned position
    assert hidden_state_loss(noisy, h, align, mask, _identity_projector(8, 2), settings).item() == pytest.approx(
        0, abs=1e-6)


def test_attention_loss_is_zero_for_equal_head_means_and_positive_otherwise():
    torch.manual_seed(0)
    t = 6
    causal = torch.ones(t, t).tril().bool()
    student = torch.softmax(torch.randn(2, 3, t, t).masked_fill(~causal, float("-inf")), -1)
    same_mean = student.mean(1, keepdim=True).expand(2, 4, t, t)  # 4 teacher heads, same average map
    align = torch.arange(t).expand(2, t).clone()
    align[1, 4:] = -1
    settings = FeatureSettings(((1, 1),), attention_weight=1.0)
    assert attention_map_loss([student], [same_mean], align, align >= 0, settings).item() == pytest.approx(
        0, abs=1e-6)
    other = torch.softmax(torch.randn(2, 4, t, t).masked_fill(~causal, float("-inf")), -1)
    assert attention_map_loss([student], [other], align, align >= 0, settings).item() > 0.01


def test_distill_module_exports_only_the_student():
    student = torch.nn.Linear(3, 3)
    module = DistillModule(student, FeatureProjector(3, 5, 2))
    exported = DistillModule.student_state_dict(module.state_dict())
    assert exported.keys() == student.state_dict().keys()


@pytest.fixture(scope="module")
def models(tiny_pair, online_batch):
    s_tok, t_tok, _, batch = online_batch("student")
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], attn_implementation="eager")
    teacher = OnlineTeacher(load_teacher(tiny_pair["teacher"], TeacherConfig(), eager_attention=True, device="cpu"),
                            s_tok, t_tok, online_topk=16, with_attention=True)
    return student, teacher, batch


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("hidden_loss", ["mse", "cosine"])
def test_feature_loss_trains_student_and_projections_across_tokenizers(models, stage, hidden_loss):
    student, teacher, batch = models
    s_cfg, t_cfg = student.config, teacher.model.config
    assert (s_cfg.hidden_size, s_cfg.num_hidden_layers, s_cfg.num_attention_heads) != (
        t_cfg.hidden_size, t_cfg.num_hidden_layers, t_cfg.num_attention_heads)
    pairs = tuple(uniform_layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers))
    settings = FeatureSettings(pairs, hidden_loss=hidden_loss, hidden_weight=1.0, attention_weight=0.5)
    projector = FeatureProjector(s_cfg.hidden_size, t_cfg.hidden_size, len(pairs))
    student.zero_grad()
    out_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, output_attentions=True)
    out_t = teacher.run(batch, "cpu")
    align = batch["align_index"]
    head = output_head(student)
    with teacher.head() as t_head:
        logit_teacher = teacher.logit_teacher(out_t, align, head.out_features, t_head, chunk_tokens=7)
        logit = call_head(head, out_s.hidden_states[-1], batch["labels"], logit_teacher,
                          LossSettings(kind="logit", alpha=0.5, temperature=2.0), chunk_tokens=7)
    out = feature_distill_loss(out_s, out_t, align, logit, projector, settings, stage)
    out.total.backward()
    assert out.total.shape == () and torch.isfinite(out.total)
    assert out.hidden > 0 and out.num_kd_tokens > 0
    for p in projector.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if stage == 1:
        assert out.kd == 0 and out.attention == 0
        assert out.total.item() == pytest.approx(out.hidden.item())
    else:
        assert out.kd > 0 and out.attention > 0
    assert not any(p.grad is not None for p in teacher.model.parameters())


def _outputs(n_states, seed):
    from types import SimpleNamespace

    torch.manual_seed(seed)
    return SimpleNamespace(hidden_states=[torch.randn(2, 5, 8) for _ in range(n_states)])


def _logit_output():
    from rayjobs.distillation.losses import LossOutput

    zero = torch.zeros((), requires_grad=True)
    return LossOutput(zero * 1.0, zero * 1.0, zero * 1.0, torch.tensor(10), torch.tensor(10))


def test_progressive_pairs_join_by_step_and_unscheduled_pairs_are_absent():
    """Pairs (1, 1), (2, 2), (3, 3) joining at steps 0, 2, 4: the hidden loss at each step is the mean
    over the pairs in force only, and the projections of the others get no gradient at all."""
    student, teacher = _outputs(4, 0), _outputs(4, 1)
    align = torch.arange(5).expand(2, 5).clone()
    settings = FeatureSettings(((1, 1), (2, 2), (3, 3)), hidden_loss="mse", start_steps=(0, 2, 4))
    proj = _identity_projector(8, 3)
    per_pair = [hidden_state_loss(student.hidden_states, teacher.hidden_states, align, align >= 0, proj,
                                  FeatureSettings((pair,), hidden_loss="mse")) for pair in settings.pairs]
    for step, in_force in [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3), (9, 3)]:
        assert settings.active(step) == tuple(k < in_force for k in range(3))
        proj.zero_grad(set_to_none=True)
        out = feature_distill_loss(student, teacher, align, _logit_output(), proj, settings, stage=1, step=step)
        assert out.hidden.item() == pytest.approx(torch.stack(per_pair[:in_force]).mean().item(), rel=1e-6)
        out.total.backward()
        assert [proj.proj[k].weight.grad is not None for k in range(3)] == [k < in_force for k in range(3)]


def test_progressive_attention_before_any_attention_pair_joins_is_zero():
    t = 4
    attn = torch.softmax(torch.randn(1, 2, t, t), -1)
    align = torch.arange(t).expand(1, t).clone()
    settings = FeatureSettings(((0, 0), (1, 1)), attention_weight=1.0, start_steps=(0, 3))
    assert attention_map_loss([attn], [attn.flip(-1)], align, align >= 0, settings, settings.active(0)).item() == 0
    assert attention_map_loss([attn], [attn.flip(-1)], align, align >= 0, settings, settings.active(3)).item() > 0


def test_feature_noise_changes_the_hidden_loss_only_when_sigma_is_on():
    student = _outputs(2, 0)
    align = torch.arange(5).expand(2, 5).clone()
    settings = FeatureSettings(((1, 1),), hidden_loss="mse")
    proj = _identity_projector(8, 1)
    clean = hidden_state_loss(student.hidden_states, student.hidden_states, align, align >= 0, proj, settings)
    noisy = hidden_state_loss(student.hidden_states, student.hidden_states, align, align >= 0, proj, settings,
                              sigma=0.5)
    assert clean.item() == pytest.approx(0, abs=1e-9)
    # Relative noise: per element variance sigma^2 * (mean square of the vector), so mse ~ sigma^2 * E[h^2].
    expected = 0.25 * student.hidden_states[1].pow(2).mean().item()
    assert noisy.item() == pytest.approx(expected, rel=0.3)
