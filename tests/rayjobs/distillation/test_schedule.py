"""LR schedules and param groups: pure, milliseconds."""

import math
from dataclasses import dataclass

import pytest

from rayjobs.distillation.schedule import (
    active_pairs,
    layer_id,
    layer_start_steps,
    loss_stage,
    lr_factor,
    make_lr_lambda,
    param_groups,
    phase_temperature,
    temperature_at,
    warmup_steps,
)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_warmup_is_linear_and_never_zero(kind):
    factors = [lr_factor(s, kind, total_steps=100, warmup=4) for s in range(4)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_linear_decays_to_min_ratio():
    f = [lr_factor(s, "linear", 10, 0, min_ratio=0.1) for s in range(12)]
    assert f[0] == pytest.approx(1.0)
    assert f[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert f[10] == pytest.approx(0.1) and f[11] == pytest.approx(0.1)  # held past the end
    assert all(a >= b for a, b in zip(f, f[1:], strict=False))


def test_cosine_midpoint_and_end():
    assert lr_factor(2 + 4, "cosine", 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(10, "cosine", 10, 2) == pytest.approx(0.0)


def test_constant_after_warmup():
    assert [lr_factor(s, "constant", 10, 2) for s in range(2, 12)] == [1.0] * 10


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, "step", 10, 0)


def test_make_lr_lambda_uses_ratio():
    assert warmup_steps(100, 0.05) == 5
    fn = make_lr_lambda("cosine", 100, 0.05)
    assert fn(0) == pytest.approx(0.2)
    assert fn(4) == pytest.approx(1.0)


def test_lambda_lr_integration():
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda("linear", 4, 0.5))
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5, 1.0, 1.0, 0.5])


@pytest.mark.parametrize("name,expected", [
    ("model.embed_tokens.weight", 0),
    ("model.layers.0.self_attn.q_proj.weight", 1),
    ("base_model.model.model.layers.2.mlp.up_proj.lora_A.default.weight", 3),
    ("transformer.h.1.attn.c_attn.weight", 2),
    ("model.norm.weight", 5),
    ("lm_head.weight", 5),
])
def test_layer_id(name, expected):
    assert layer_id(name, num_layers=4) == expected


@dataclass
class FakeParam:
    ndim: int
    requires_grad: bool = True


def _params():
    return [
        ("model.embed_tokens.weight", FakeParam(2)),
        ("model.layers.0.self_attn.q_proj.weight", FakeParam(2)),
        ("model.layers.0.input_layernorm.weight", FakeParam(1)),
        ("model.layers.1.mlp.down_proj.weight", FakeParam(2)),
        ("model.layers.1.mlp.down_proj.bias", FakeParam(1)),
        ("model.norm.weight", FakeParam(1)),
        ("lm_head.weight", FakeParam(2)),
        ("frozen.weight", FakeParam(2, requires_grad=False)),
    ]


def test_param_groups_without_layer_decay():
    groups = param_groups(_params(), lr=1e-3, weight_decay=0.1, num_layers=2)
    assert len(groups) == 2
    by_wd = {g["weight_decay"]: g for g in groups}
    assert len(by_wd[0.1]["params"]) == 4  # the 2-d weights
    assert len(by_wd[0.0]["params"]) == 3  # norms and bias
    assert all(g["lr"] == 1e-3 for g in groups)
    assert sum(len(g["params"]) for g in groups) == 7  # frozen excluded


def test_param_groups_layerwise_decay():
    named = _params()
    groups = param_groups(named, lr=1.0, weight_decay=0.0, num_layers=2, layerwise_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    lr_by_name = {name: lr_of[id(p)] for name, p in named if p.requires_grad}
    assert lr_by_name["model.embed_tokens.weight"] == pytest.approx(0.125)
    assert lr_by_name["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.25)
    assert lr_by_name["model.layers.0.input_layernorm.weight"] == pytest.approx(0.25)
    assert lr_by_name["model.layers.1.mlp.down_proj.weight"] == pytest.approx(0.5)
    assert lr_by_name["lm_head.weight"] == pytest.approx(1.0)
    assert lr_by_name["model.norm.weight"] == pytest.approx(1.0)
    assert all(g["lr_scale"] == pytest.approx(g["lr"]) for g in groups)


def test_param_groups_needs_trainable():
    with pytest.raises(ValueError, match="no trainable"):
        param_groups([("w", FakeParam(2, requires_grad=False))], 1.0, 0.0, 1)


def test_temperature_ramps_linearly_from_start_to_end():
    assert temperature_at(0, 11, 3.0, 1.0) == 3.0
    assert temperature_at(5, 11, 3.0, 1.0) == pytest.approx(2.0)
    assert temperature_at(10, 11, 3.0, 1.0) == 1.0
    assert temperature_at(50, 11, 3.0, 1.0) == 1.0
    assert temperature_at(0, 1, 3.0, 1.0) == 1.0


def test_two_stages():
    assert [loss_stage(s, 3) for s in range(5)] == [1, 1, 1, 2, 2]
    assert loss_stage(0, 0) == 2


def test_warmup_in_steps_replaces_the_ratio():
    fn = make_lr_lambda("constant", 100, 0.5, warmup=4)
    assert [fn(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert make_lr_lambda("constant", 100, 0.0, warmup=0)(0) == 1.0


def test_warmup_steps_and_ratio_are_one_or_the_other():
    from rayjobs.distillation.config import OptimConfig

    assert OptimConfig(warmup_steps=10).warmup(1000) == 10
    assert OptimConfig().warmup(100) == 5 and OptimConfig(warmup_ratio=0.2).warmup(100) == 20  # default 0.05
    # What the workers get is the dumped config: it must validate again.
    assert OptimConfig.model_validate(OptimConfig(warmup_steps=10).model_dump(mode="json")).warmup(1000) == 10
    with pytest.raises(ValueError, match="warmup_steps and optim.warmup_ratio both set"):
        OptimConfig(warmup_steps=10, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="must be below optim.max_steps"):
        OptimConfig(warmup_steps=10, max_steps=10)


def _phases(*raw):
    from rayjobs.distillation.recipe_config import TemperaturePhase, check_phases

    return check_phases([TemperaturePhase(**p) for p in raw])


def test_temperature_phases_in_epochs_and_steps():
    by_epoch = _phases({"until_epoch": 1, "temperature": 2.0}, {"temperature": 1.0})
    assert [phase_temperature(s, by_epoch, steps_per_epoch=3) for s in range(5)] == [2.0, 2.0, 2.0, 1.0, 1.0]
    by_step = _phases({"until_step": 1, "temperature": 4.0}, {"until_step": 3, "temperature": 2.0},
                      {"temperature": 1.0})
    assert [phase_temperature(s, by_step, 0) for s in range(5)] == [4.0, 2.0, 2.0, 1.0, 1.0]


@pytest.mark.parametrize("raw,match", [
    ([{"until_step": 2, "temperature": 2.0}], "last .* has no until_step"),
    ([{"temperature": 2.0}, {"temperature": 1.0}], "needs until_step or until_epoch"),
    ([{"until_step": 2, "temperature": 2.0}, {"until_epoch": 2, "temperature": 1.5}, {"temperature": 1.0}], "mix"),
    ([{"until_step": 3, "temperature": 2.0}, {"until_step": 3, "temperature": 1.5}, {"temperature": 1.0}], "increase"),
])
def test_temperature_phases_refuse_ambiguous_schedules(raw, match):
    with pytest.raises(ValueError, match=match):
        _phases(*raw)


def test_progressive_start_steps_lowest_student_layer_first():
    assert layer_start_steps([1, 2, 3], every=5) == (0, 5, 10)
    assert layer_start_steps([3, 0, 3, 1], every=2) == (4, 0, 4, 2)  # pairs on one student layer join together
    assert active_pairs(0, (0, 5, 10), 3) == (True, False, False)
    assert active_pairs(5, (0, 5, 10), 3) == (True, True, False)
    assert active_pairs(99, (0, 5, 10), 3) == (True, True, True)
    assert active_pairs(0, None, 2) == (True, True)


def test_temperature_phases_in_epochs_need_the_plans_steps_per_epoch():
    with pytest.raises(ValueError, match="steps per epoch"):
        phase_temperature(0, _phases({"until_epoch": 1, "temperature": 2.0}, {"temperature": 1.0}), 0.0)
