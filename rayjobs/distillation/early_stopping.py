"""Early stopping over the periodic evaluations (``distillation.eval_every`` + ``early_stopping``).

Pure bookkeeping, no torch or Ray: the worker evaluates, this module decides. The record lives in
``TrainerState.best`` so a resumed run keeps its best step, its count of evaluations without an
improvement and where the best weights were exported::

    {"metric": "val_loss", "step": 12, "value": 1.93, "bad_evals": 2, "last_step": 20,
     "location": ".../versions/<run>-<time>"}

Why export at each improvement rather than keep a checkpoint to reload: Ray Train keeps only the
newest checkpoints (``num_to_keep``), and reloading one at the end would rebuild a DeepSpeed
engine; the merged HF export is what ships anyway, and it survives a crash. Improvements are
frequent early and rare once the metric flattens, which is when early stopping matters.
"""

from __future__ import annotations

import math

from rayjobs.distillation.config import EarlyStoppingConfig


def is_improvement(value: float | None, best: float | None, direction: str, min_delta: float) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta``; a missing or non-finite value never does."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if direction == "min" else value > best + min_delta


def record_eval(best: dict, step: int, metrics: dict, cfg: EarlyStoppingConfig) -> tuple[dict, bool]:
    """``(new record, improved)`` after an evaluation at optimizer ``step`` with ``metrics``."""
    value = metrics.get(cfg.metric)
    if is_improvement(value, best.get("value"), cfg.direction, cfg.min_delta):
        return {"metric": cfg.metric, "step": step, "value": value, "bad_evals": 0, "last_step": step}, True
    return {**best, "metric": cfg.metric, "bad_evals": best.get("bad_evals", 0) + 1, "last_step": step}, False


def should_stop(best: dict, cfg: EarlyStoppingConfig) -> bool:
    """``patience`` evaluations in a row without an improvement."""
    return best.get("bad_evals", 0) >= cfg.patience


def evaluated_at(best: dict, step: int) -> bool:
    """Whether the record already holds the evaluation of ``step`` (the final one is then not counted twice)."""
    return best.get("last_step") == step


def summary(best: dict, stopped_at: int | None, total_steps: int) -> dict:
    """What ``summary.json`` says about early stopping."""
    return {"metric": best.get("metric"), "best_step": best.get("step"), "best_value": best.get("value"),
            "stopped_at": stopped_at, "planned_steps": total_steps}
