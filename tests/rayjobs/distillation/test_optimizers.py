"""Item 8 of #21: Adafactor and LAMB beside AdamW, built over our param groups (pure torch, milliseconds)."""

import pytest
import torch

from rayjobs.distillation.config import DistillationConfig
from rayjobs.distillation.deepspeed_config import build_deepspeed_config
from rayjobs.distillation.optimizers import Lamb, make_optimizer, optimizer_spec
from rayjobs.distillation.schedule import param_groups


def _cfg(**kw) -> DistillationConfig:
    return DistillationConfig.model_validate({"student": "s", "output": "o", **kw})


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def _one_step(name: str, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(param_groups(model.named_parameters(), lr, 0.01, num_layers=0), name, lr, 0.01)
    model(torch.randn(4, 6)).pow(2).mean().backward()
    opt.step()
    return model, opt, before


def test_adafactor_config_and_deepspeed_config_it_runs_under():
    cfg = _cfg(optim={"optimizer": "adafactor", "lr": 1e-2, "weight_decay": 0.1}, deepspeed={"zero_stage": 0})
    assert optimizer_spec(cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay) == (
        "Adafactor", {"lr": 1e-2, "weight_decay": 0.1})
    ds = build_deepspeed_config(cfg, 1)
    assert "optimizer" not in ds and ds["zero_optimization"]["stage"] == 0  # our client optimizer, unflattened
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


@pytest.mark.parametrize("name", ["adafactor", "lamb"])
@pytest.mark.parametrize("ds", [{"zero_stage": 2}, {"zero_stage": 0, "precision": "bf16"}])
def test_adafactor_and_lamb_refuse_flattening_deepspeed_settings(name, ds):
    with pytest.raises(ValueError, match=f"optim.optimizer '{name}' needs deepspeed.zero_stage 0"):
        _cfg(optim={"optimizer": name}, deepspeed=ds)


def test_adafactor_step_updates_parameters_with_factored_moments():
    model, opt, before = _one_step("adafactor", 1e-2)
    assert isinstance(opt, torch.optim.Adafactor)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    weight_state = opt.state[model[0].weight]
    assert weight_state["row_var"].numel() == 5 and weight_state["col_var"].numel() == 6  # factored, not 5 x 6
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.01}  # norms and biases not decayed


def test_lamb_config_and_step_updates_parameters():
    assert optimizer_spec("lamb", 1e-3, 0.0) == ("Lamb", {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999),
                                                          "eps": 1e-6})
    model, opt, before = _one_step("lamb", 1e-2)
    assert isinstance(opt, Lamb)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_lamb_step_is_the_trust_ratio_times_the_adam_update():
    """One step from zero moments: ``u = g / (|g| + eps)`` elementwise (bias-corrected), plus decay;
    the tensor moves by ``lr * ||p|| / ||u|| * u``, i.e. by ``lr * ||p||`` in norm."""
    p = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    p.grad = torch.tensor([0.5, 2.0])
    Lamb([p], lr=0.1, eps=1e-6, weight_decay=0.0).step()
    u = torch.tensor([0.5, 2.0]) / (torch.tensor([0.5, 2.0]) + 1e-6)
    expected = torch.tensor([3.0, -4.0]) - 0.1 * 5.0 / u.norm() * u
    assert torch.allclose(p.detach(), expected)
    assert (p.detach() - torch.tensor([3.0, -4.0])).norm().item() == pytest.approx(0.5, rel=1e-5)


def test_lamb_zero_parameter_uses_trust_one():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    Lamb([p], lr=0.1).step()
    assert torch.allclose(p.detach(), torch.full((3,), -0.1), atol=1e-5)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optim.optimizer 'sgd'"):
        optimizer_spec("sgd", 1e-3, 0.0)
