"""The student's optimizer: AdamW, Adafactor or LAMB over our param groups (``optim.optimizer``).

The train loop builds the optimizer itself and hands it to ``deepspeed.initialize`` (see
``rayjobs.distillation.deepspeed_config``), so one layer-wise param-group and LR-schedule
implementation serves all three. Why not DeepSpeed's config ``optimizer`` section: DeepSpeed
0.19 names ``Lamb`` there, but builds ``deepspeed.ops.lamb.FusedLamb`` (a JIT-compiled CUDA kernel
whose engine asserts fp16 dynamic loss scaling), so it neither runs on CPU workers nor in fp32/bf16;
it has no Adafactor at all. So: torch's ``Adafactor`` and the pure-torch ``Lamb`` below, which run
on CPU and GPU alike.

Both see each parameter's real shape only without ZeRO and without DeepSpeed's mixed-precision
wrappers (those flatten every param group into one fp32 vector); the config refuses other
combinations (``DistillationConfig._optimizer_sees_real_shapes``).
"""

from __future__ import annotations

from typing import Any

import torch

OPTIMIZERS = ("adamw", "adafactor", "lamb")


def optimizer_spec(name: str, lr: float, weight_decay: float) -> tuple[str, dict[str, Any]]:
    """``(class name, constructor kwargs)`` of the optimizer ``name`` builds; pure, for tests and logs.

    Adafactor (Shazeer & Stern 2018) keeps row and column second-moment factors for matrices and no
    first moment; torch's version caps the step at ``min(lr, 1/sqrt(t))`` times the parameter's RMS
    (its "relative step"), so its useful ``lr`` is ~3e-2 (``bench/optimizers.py``), ten times
    AdamW's. Weight decay, for all three, is decoupled and per group (norms and biases get 0,
    ``schedule.param_groups``).
    """
    if name == "adamw":
        return "AdamW", {"lr": lr, "weight_decay": weight_decay}
    if name == "adafactor":
        return "Adafactor", {"lr": lr, "weight_decay": weight_decay}
    if name == "lamb":
        return "Lamb", {"lr": lr, "weight_decay": weight_decay, "betas": (0.9, 0.999), "eps": 1e-6}
    raise ValueError(f"unknown optim.optimizer {name!r}; known: {list(OPTIMIZERS)}")


def make_optimizer(groups: list[dict[str, Any]], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer over ``schedule.param_groups`` output (each group keeps its own lr and decay)."""
    cls_name, kwargs = optimizer_spec(name, lr, weight_decay)
    cls = Lamb if cls_name == "Lamb" else getattr(torch.optim, cls_name)
    return cls(groups, **kwargs)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), decoupled weight decay.

    Per tensor: Adam's bias-corrected update ``u = m_hat / (sqrt(v_hat) + eps) + wd * p``, scaled by
    the trust ratio ``||p|| / ||u||`` (1 when either norm is 0), so every layer moves by a similar
    fraction of its own size whatever its gradient scale: what lets the batch grow without
    re-tuning the LR per layer.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lamb: lr and eps must be > 0 and betas in [0, 1), got {lr}, {eps}, {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * p
                p_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
                p.add_(update * trust, alpha=-group["lr"])
        return loss
