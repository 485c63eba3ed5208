"""Teacher diagnostics over stored top-k arrays (issue #21 item 4): pure unit tests."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from datasets_pipeline import records as R
from datasets_pipeline.diagnostics import one_hot_warning, position_measures, summarize, teacher_stats
from datasets_pipeline.stats import merge_stats, shard_stats


def _lp(*probs):
    return [math.log(p) if p > 0 else -math.inf for p in probs]


def test_diagnostics_entropy_and_top1_per_position():
    flat = np.asarray(_lp(1.0, 0.0, 0.0) + _lp(0.5, 0.3, 0.0) + _lp(1 / 3, 1 / 3, 1 / 3), np.float32)
    entropy, top1 = position_measures(flat, 3)
    rest = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))  # 0.2 outside the top-k: one bin
    assert entropy == pytest.approx([0.0, rest, math.log(3)], abs=1e-6)
    assert top1 == pytest.approx([1.0, 0.5, 1 / 3], abs=1e-6)


def test_diagnostics_float16_storage_of_a_certain_teacher_is_near_one_hot():
    lps = np.asarray([-1e-4, -12.0, -14.0, -16.0], np.float16)  # as generation stores them
    entropy, top1 = position_measures(lps, 4)
    assert top1[0] > 0.99 and 0 <= entropy[0] < 0.01


def _row(split: str, k: int, probs: list[list[float]]) -> dict:
    flat = [lp for p in probs for lp in _lp(*p)]
    return {"sample_id": "s", "prompt_id": "p", "sample_index": 0, "split": split, "messages": "[]",
            "completion": "x", "answer": "x", "teacher_token_ids": list(range(len(probs))), "topk_k": k,
            "topk_ids": [0] * len(flat), "topk_logprobs": flat, "input_ids": [1, 2], "prompt_len": 1,
            "teacher_offset": 0, "teacher_align": [], "topk_student_ids": []}


def _table(rows):
    return pa.Table.from_pylist(rows, schema=R.SAMPLE_SCHEMA)


def test_diagnostics_counts_ride_in_the_shard_stats_and_add_up():
    a = [_row("train", 2, [[1.0, 0.0], [0.6, 0.4]]), _row("val", 2, [[0.995, 0.005]])]
    b = [_row("train", 3, [[0.5, 0.25, 0.25]]), _row("train", 0, [])]
    merged = merge_stats([shard_stats(_table(a)), shard_stats(_table(b))])
    assert merged["train"]["teacher_positions"] == 3 and merged["val"]["teacher_positions"] == 1
    assert merged["train"]["teacher_near_one_hot"] == 1 and merged["val"]["teacher_near_one_hot"] == 1
    diag = summarize(merged)
    assert diag["positions"] == 4 and diag["near_one_hot_share"] == pytest.approx(0.5)
    assert diag["mean_top1"] == pytest.approx((1.0 + 0.6 + 0.5 + 0.995) / 4, abs=1e-3)
    assert sum(diag["top1_hist"].values()) == sum(diag["entropy_hist"].values()) == 4
    assert diag["top1_hist"]["0.95"] == 2 and diag["entropy_hist"]["0.00"] == 2
    assert diag["per_split"]["val"]["near_one_hot_share"] == 1.0
    assert diag["per_split"]["train"]["mean_entropy"] == pytest.approx(
        (0.0 - 0.6 * math.log(0.6) - 0.4 * math.log(0.4) - 0.5 * math.log(0.5) - 0.5 * math.log(0.25)) / 3, abs=1e-3)


def test_diagnostics_none_without_topk():
    assert teacher_stats(_table([_row("train", 0, [])])) == {}
    assert summarize(shard_stats(_table([_row("train", 0, [])]))) is None
    assert one_hot_warning(None) is None


def test_diagnostics_warn_only_for_logit_kd_over_a_one_hot_teacher():
    from rayjobs.distillation.config import DistillationConfig
    from rayjobs.distill import teacher_warning

    sure = shard_stats(_table([_row("train", 2, [[1.0, 0.0]] * 100)]))
    unsure = shard_stats(_table([_row("train", 2, [[1.0, 0.0]] * 98 + [[0.5, 0.5]] * 2)]))
    logit = DistillationConfig.model_validate({"student": "s", "output": "o", "loss": {"kind": "logit"}})
    data = DistillationConfig.model_validate({"student": "s", "output": "o"})
    assert "100.0% of positions" in teacher_warning(logit, {"teacher_diagnostics": summarize(sure)})
    assert teacher_warning(logit, {"stats": sure})  # manifests from before the diagnostics: from their stats
    assert teacher_warning(logit, {"teacher_diagnostics": summarize(unsure)}) is None
    assert teacher_warning(data, {"teacher_diagnostics": summarize(sure)}) is None


def test_diagnostics_in_the_run_report(tmp_path):
    from rayjobs.report import write_report

    diag = summarize(shard_stats(_table([_row("train", 2, [[1.0, 0.0], [0.7, 0.3]])])))
    manifest = {"counts": {"kept": 1}, "rows": {"train": 1, "val": 0}, "teacher_diagnostics": diag}
    report = write_report(str(tmp_path), {"run": "r"}, {}, manifest, None)
    text = open(report).read()
    assert "## Teacher diagnostics" in text and "| train | 2 |" in text
    assert (tmp_path / "teacher.png").read_bytes().startswith(b"\x89PNG")
