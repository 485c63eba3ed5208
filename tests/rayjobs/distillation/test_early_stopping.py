"""Periodic evaluation and early stopping (issue #21 item 3): the pure rule, the config, and one
Ray Train + DeepSpeed run on the tiny demo world that overfits, stops early and merges its best step."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from rayjobs.distillation.config import DistillationConfig, EarlyStoppingConfig
from rayjobs.distillation.early_stopping import evaluated_at, is_improvement, record_eval, should_stop


def _run(values, **rule):
    """Feed ``values`` (one evaluation each, steps 1, 2, ...) to the rule until it says stop."""
    cfg, best = EarlyStoppingConfig(**rule), {}
    for step, value in enumerate(values, start=1):
        best, _ = record_eval(best, step, {cfg.metric: value}, cfg)
        if should_stop(best, cfg):
            return best, step
    return best, None


def test_early_stopping_keeps_the_best_step_and_stops_after_patience():
    best, stopped = _run([3.0, 2.0, 1.5, 1.6, 1.7, 1.4], patience=2)
    assert (best["step"], best["value"], stopped) == (3, 1.5, 5)


def test_early_stopping_min_delta_counts_small_gains_as_none():
    best, stopped = _run([3.0, 2.95, 2.92, 2.0], patience=2, min_delta=0.1)
    assert (best["step"], stopped) == (1, 3)
    best, stopped = _run([3.0, 2.95, 2.0, 1.0], patience=2, min_delta=0.01)
    assert (best["step"], stopped) == (4, None)


def test_early_stopping_max_mode_for_exact_match():
    assert EarlyStoppingConfig(metric="val_em").direction == "max"
    assert EarlyStoppingConfig(metric="val_loss").direction == "min"
    assert EarlyStoppingConfig(metric="val_loss", mode="max").direction == "max"
    best, stopped = _run([0.1, 0.5, 0.4, 0.5], metric="val_em", patience=2)
    assert (best["step"], best["value"], stopped) == (2, 0.5, 4)


def test_early_stopping_never_takes_a_non_finite_value():
    assert not is_improvement(math.nan, None, "min", 0.0)
    assert not is_improvement(None, 1.0, "min", 0.0)
    assert not is_improvement(math.inf, None, "min", 0.0)
    best, stopped = _run([2.0, math.nan, math.inf], patience=2)
    assert (best["step"], stopped) == (1, 3)


def test_early_stopping_knows_which_step_it_evaluated():
    cfg = EarlyStoppingConfig()
    best, improved = record_eval({}, 4, {"val_loss": 1.0}, cfg)
    assert improved and evaluated_at(best, 4) and not evaluated_at(best, 5)


def _distill(**extra) -> dict:
    return {"student": "s", "output": "/tmp/o", **extra}


def test_early_stopping_config_names_what_is_missing():
    with pytest.raises(ValidationError, match="needs distillation.eval_every"):
        DistillationConfig.model_validate(_distill(early_stopping={"patience": 2}))
    with pytest.raises(ValidationError, match="eval_em_samples > 0"):
        DistillationConfig.model_validate(_distill(eval_every=5, early_stopping={"metric": "val_em"}))
    with pytest.raises(ValidationError, match="zero_stage 3"):
        DistillationConfig.model_validate(_distill(eval_every=5, eval_em_samples=8, deepspeed={"zero_stage": 3}))
    d = DistillationConfig.model_validate(_distill(eval_every=5, eval_em_samples=8,
                                                   early_stopping={"metric": "val_em", "patience": 4}))
    assert d.early_stopping.patience == 4 and d.early_stopping.direction == "max"


def test_early_stopping_refused_without_val_rows():
    from cluster.errors import ConfigError
    from rayjobs.distillation.plan import check_supported

    d = DistillationConfig.model_validate(_distill(eval_every=5, early_stopping={}))
    with pytest.raises(ConfigError, match="val_fraction"):
        check_supported(d, {"train": 10, "val": 0, "with_teacher_topk": 0})


def test_early_stopping_curves_plot_the_evaluations():
    from rayjobs.distillation.curves import render_png

    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "attempt": 0} for s in range(1, 7)]
    for r in rows[1::2]:
        r.update(val_loss=2.9 - 0.05 * r["step"], val_em=0.1 * r["step"])
    assert render_png(rows).startswith(b"\x89PNG")


def _wide_student(student: str, out) -> str:
    """The tiny world's student (its tokenizer, so the shards fit) at width 128 and 2 blocks, random init."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(student, out)
    cfg = AutoConfig.from_pretrained(student)
    cfg.update({"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "head_dim": 32})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return str(out)


@pytest.mark.slow
def test_early_stopping_an_overfitting_run_stops_and_merges_its_best_step(tiny_world, xtok_world, distill_config,
                                                                          ray_local, tmp_path):
    """A student wide enough to memorize 40 train rows: validation loss falls, then climbs; the run stops
    ``patience`` evaluations after its best and the merged student is the best step's, checked by
    measuring the merged model's validation cross-entropy against the curve."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayjobs.config import load_config
    from rayjobs.distill import eval_records, run
    from rayjobs.distillation.evaluate import _perplexity

    path = distill_config("early-stop", {
        "student": _wide_student(tiny_world.student, tmp_path / "wide-student"),
        "optim": {"lr": 3e-3, "max_steps": 150, "micro_batch_size": 8, "warmup_ratio": 0.0, "schedule": "constant"},
        "eval_every": 5, "eval_em_samples": 4,
        "early_stopping": {"metric": "val_loss", "patience": 3},
    })
    summary = run(load_config(path))
    out = xtok_world / "out" / "early-stop"
    rows = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "val_loss" in r}
    stop = summary["early_stopping"]
    print(f"early stopping: {stop}; val_loss by step {({s: round(r['val_loss'], 4) for s, r in evals.items()})}")
    assert stop["stopped_at"] is not None and stop["stopped_at"] < 150 == stop["planned_steps"]
    assert summary["steps"] == stop["stopped_at"] == rows[-1]["step"] and sorted(evals) == list(range(5, rows[-1]["step"] + 1, 5))
    assert all("val_em" in r and "val_teacher_agreement" in r for r in evals.values())
    best = min(evals, key=lambda s: evals[s]["val_loss"])
    assert summary["merged_step"] == stop["best_step"] == best < stop["stopped_at"]
    assert stop["stopped_at"] - best == 3 * 5  # patience evaluations, eval_every apart

    merged = summary["merged"]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    records = eval_records(str(xtok_world / "generated"))
    ce = math.log(_perplexity(model, AutoTokenizer.from_pretrained(merged), records, 8, 128, None))
    assert ce == pytest.approx(evals[best]["val_ce"], rel=1e-3)
    assert abs(ce - evals[stop["stopped_at"]]["val_ce"]) > 1e-3
