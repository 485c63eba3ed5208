"""Learning-rate and loss schedules, and optimizer param groups (layer-wise LR decay, no-decay params).

Pure: no torch import. The schedule is a multiplier of each group's base LR, for
``torch.optim.lr_scheduler.LambdaLR``; the train loop and the plain-PyTorch benchmark share it.

Step convention (LambdaLR's): ``lr_factor(s)`` is the multiplier in force for optimizer step
``s + 1``, i.e. step 0 is the first update. Warmup is linear from ``1 / warmup_steps`` up to 1
at ``s = warmup_steps - 1``, so the first update never uses LR 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

SCHEDULES = ("linear", "cosine", "constant")

# Transformer block index in parameter names of HF decoders ("model.layers.3.mlp..." in Llama,
# Qwen2, Mistral; "transformer.h.3..." in GPT-2), with or without a peft prefix.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_positions|embeddings)\.")


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(total_steps * warmup_ratio))


def lr_factor(step: int, kind: str, total_steps: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR for update ``step + 1`` (0-based ``step``).

    After warmup, ``linear`` and ``cosine`` decay from 1 to ``min_ratio`` at ``total_steps``;
    ``constant`` stays at 1. Steps past ``total_steps`` keep the final value.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; known: {list(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    if kind == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def make_lr_lambda(kind: str, total_steps: int, warmup_ratio: float, min_ratio: float = 0.0,
                   warmup: int | None = None) -> Callable[[int], float]:
    """``warmup`` (steps), when given, replaces ``warmup_ratio`` (``optim.warmup_steps``)."""
    warmup = warmup_steps(total_steps, warmup_ratio) if warmup is None else warmup
    return lambda step: lr_factor(step, kind, total_steps, warmup, min_ratio)


def loss_stage(step: int, stage1_steps: int) -> int:
    """Two-stage feature distillation: 1 for the first ``stage1_steps`` updates (0-based ``step``), then 2."""
    return 1 if step < stage1_steps else 2


def temperature_at(step: int, total_steps: int, start: float, end: float) -> float:
    """KD temperature for update ``step + 1``: linear from ``start`` (first update) to ``end`` (last).

    Higher early (softer targets carry more of the teacher's ranking while the student is far
    off), annealed to ``end`` (usually 1.0, the distribution the student will sample from).
    """
    return linear_ramp(step, total_steps, start, end)


def linear_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at update 1 (``step`` 0), ``end`` at the last update and after, linear between."""
    if total_steps <= 1:
        return end
    progress = min(max(step, 0) / (total_steps - 1), 1.0)
    return start + (end - start) * progress


def phase_temperature(step: int, phases: Sequence[Any], steps_per_epoch: float) -> float:
    """KD temperature for update ``step + 1`` from explicit phases (``schedule.temperatures``).

    A phase ending at ``until_step = N`` covers updates 1..N; ``until_epoch = E`` covers the
    updates of the first E epochs (``E * steps_per_epoch`` of them, rounded). The last phase runs on.
    """
    for phase in phases:
        if phase.until_step is not None:
            end = phase.until_step
        elif phase.until_epoch is not None:
            if steps_per_epoch <= 0:
                raise ValueError("schedule.temperatures ends a phase in epochs but the run's steps per epoch "
                                 "are unknown")
            end = round(phase.until_epoch * steps_per_epoch)
        else:
            return phase.temperature
        if step < end:
            return phase.temperature
    return phases[-1].temperature


def layer_start_steps(student_indices: Sequence[int], every: int) -> tuple[int, ...]:
    """Progressive layers: a pair's first step is ``every`` times the rank of its student index
    among the distinct ones (lowest first), so pairs on one student layer join together."""
    ranks = {s: r for r, s in enumerate(sorted(set(student_indices)))}
    return tuple(ranks[s] * every for s in student_indices)


def active_pairs(step: int, start_steps: Sequence[int] | None, num_pairs: int) -> tuple[bool, ...]:
    """Which layer pairs the feature losses count at update ``step + 1``; all without a schedule."""
    if start_steps is None:
        return (True,) * num_pairs
    return tuple(step >= s for s in start_steps)


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, ``i + 1`` for block ``i``, ``num_layers + 1`` for the rest (final norm, head)."""
    if match := _LAYER.search(name):
        return int(match.group(1)) + 1
    if _EMBEDDING.search(name):
        return 0
    return num_layers + 1


def _no_weight_decay(name: str, ndim: int) -> bool:
    """Biases and norm scales are not decayed (AdamW practice since BERT)."""
    return ndim < 2 or "norm" in name.lower()


def param_groups(
    named_params: Iterable[tuple[str, Any]],
    lr: float,
    weight_decay: float,
    num_layers: int,
    layerwise_decay: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW param groups over the trainable params (``requires_grad``).

    With ``layerwise_decay`` = d, a param of layer id ``i`` (see ``layer_id``) gets
    ``lr * d ** (num_layers + 1 - i)``: the head keeps the base LR and each block below gets d
    times the one above (ELECTRA/BEiT). Each group records ``lr_scale`` and ``layer_id`` for logs.
    Params are duck-typed: anything with ``requires_grad`` and ``ndim``.
    """
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lid = layer_id(name, num_layers) if layerwise_decay is not None else num_layers + 1
        no_decay = _no_weight_decay(name, param.ndim)
        key = (lid, no_decay)
        if key not in groups:
            scale = layerwise_decay ** (num_layers + 1 - lid) if layerwise_decay is not None else 1.0
            groups[key] = {
                "params": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "layer_id": lid,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("no trainable parameters (all have requires_grad=False)")
    return [groups[k] for k in sorted(groups)]
