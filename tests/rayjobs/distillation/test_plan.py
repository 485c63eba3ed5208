"""The distillation stage's small pure parts: step planning, refusals, eval metrics, gate, curves."""

import json

import pytest

from cluster.errors import ConfigError
from rayjobs.distillation.curves import render_png, steady_tokens_per_s, write_curves
from rayjobs.distillation.plan import (
    check_models, check_student_tokenizer, check_supported, context_limit, context_report, plan_steps,
    stored_teacher_tokenizer, training_columns,
)
from rayjobs.distillation.config import DistillationConfig, GateConfig
from rayjobs.distillation.evaluate import answer_metrics, check_gate, token_f1


def _d(**kw) -> DistillationConfig:
    return DistillationConfig.model_validate({"student": "s", "output": "o", **kw})


def test_plan_steps_from_epochs():
    d = _d(optim={"micro_batch_size": 8, "grad_accum": 2, "epochs": 1.5})
    plan = plan_steps(100, d.optim, num_workers=2)
    assert plan.rows_per_worker == 50
    assert plan.micro_batches_per_epoch == 7  # last one short
    assert plan.total_steps == 6  # ceil(1.5 * 7 / 2)
    assert plan.steps_per_epoch == 3.5  # what temperature phases in epochs count in


def test_plan_steps_max_steps_wins():
    assert plan_steps(100, _d(optim={"max_steps": 3, "epochs": 10}).optim, 1).total_steps == 3


def test_plan_steps_needs_a_row_per_worker():
    with pytest.raises(ValueError, match="cannot feed"):
        plan_steps(1, _d().optim, 2)


def test_online_teacher_needs_no_stored_topk():
    stats = {"train": 10, "val": 0, "with_teacher_topk": 0}
    check_supported(_d(loss={"kind": "feature"}), stats)
    check_supported(_d(loss={"kind": "logit"}, teacher={"source": "online"}), stats)


def test_layer_map_is_checked_against_both_models():
    d = _d(loss={"kind": "feature", "feature": {"layer_map": [[1, 2], [3, 4]]}})
    with pytest.raises(ConfigError, match=r"distillation.loss.feature.layer_map: .*\[3, 4\] is outside"):
        check_models(d, {"num_hidden_layers": 2}, {"num_hidden_layers": 4})
    check_models(_d(loss={"kind": "feature"}), {"num_hidden_layers": 2}, {"num_hidden_layers": 4})


def test_contrastive_layers_are_checked_against_both_models():
    def d(**layers):
        return _d(loss={"kind": "feature", "contrastive": {"weight": 0.1, **layers}})

    check_models(d(student_layer=2, teacher_layer=-5), {"num_hidden_layers": 2}, {"num_hidden_layers": 4})
    with pytest.raises(ConfigError, match="contrastive.student_layer 3 is outside the 3 hidden states"):
        check_models(d(student_layer=3), {"num_hidden_layers": 2}, {"num_hidden_layers": 4})
    with pytest.raises(ConfigError, match="contrastive.teacher_layer -6"):
        check_models(d(teacher_layer=-6), {"num_hidden_layers": 2}, {"num_hidden_layers": 4})


def test_context_report_counts_by_policy():
    stats = {"over_context": 3}
    assert context_report(_d(), 128, stats) == {"limit": 128, "policy": "truncate", "over_limit": 3,
                                                "truncated": 3, "dropped": 0}
    assert context_report(_d(context_policy="drop"), 128, stats)["dropped"] == 3
    assert context_limit(_d(max_seq_len=512), {"max_position_embeddings": 128}) == 128
    assert context_limit(_d(max_seq_len=64), {"max_position_embeddings": 128}) == 64


def test_fp16_needs_gpu():
    with pytest.raises(ConfigError, match="fp16"):
        check_supported(_d(deepspeed={"precision": "fp16"}))
    check_supported(_d(deepspeed={"precision": "fp16"}, scaling={"use_gpu": True}))


def test_logit_loss_needs_teacher_topk():
    stats = {"train": 10, "val": 0, "with_teacher_topk": 0}
    with pytest.raises(ConfigError, match="logprobs_topk"):
        check_supported(_d(loss={"kind": "logit"}), stats)
    check_supported(_d(loss={"kind": "data"}), stats)
    with pytest.raises(ConfigError, match="no 'train' rows"):
        check_supported(_d(), {"train": 0, "val": 3, "with_teacher_topk": 3})


def test_student_tokenizer_must_be_the_shards_one():
    recorded = {"path": "/models/qwen", "sha256": "a" * 64}
    check_student_tokenizer(recorded, "/models/qwen-copy", "a" * 64, "runs/gen")  # same content, other path
    check_student_tokenizer(None, "/models/llama", "b" * 64, "runs/gen")  # shards from before the record
    with pytest.raises(ConfigError) as e:
        check_student_tokenizer(recorded, "/models/llama", "b" * 64, "runs/gen")
    for part in ("runs/gen", "/models/qwen", "a" * 16, "/models/llama", "b" * 16, "distillation.student",
                 "generation.student_tokenizer"):
        assert part in str(e.value)


def test_stored_cross_tokenizer_topk_needs_the_recorded_teacher_tokenizer():
    manifest = {"tokenizers": {"teacher": {"path": "/models/r1", "sha256": "a" * 64}}}
    xtok, same = {"xtok": 5}, {"xtok": 0}
    assert stored_teacher_tokenizer(_d(loss={"kind": "logit"}), manifest, xtok, "runs/gen") == "/models/r1"
    # Nothing to map: same-tokenizer rows, ULD (the teacher's own ids), no stored KD.
    assert stored_teacher_tokenizer(_d(loss={"kind": "logit"}), manifest, same, "runs/gen") is None
    assert stored_teacher_tokenizer(_d(loss={"kind": "logit", "xtok": {"method": "uld"}}), None, xtok, "x") is None
    assert stored_teacher_tokenizer(_d(loss={"kind": "data"}), None, xtok, "runs/gen") is None
    # Shards from before the manifest named the teacher's tokenizer: refused, saying what to do.
    with pytest.raises(ConfigError) as e:
        stored_teacher_tokenizer(_d(loss={"kind": "logit"}), {"complete": True}, xtok, "runs/gen")
    for part in ("runs/gen", "regenerate", "distillation.loss.xtok.method"):
        assert part in str(e.value)


def test_training_columns_skip_teacher_for_data_loss():
    assert "topk_ids" not in training_columns(_d(loss={"kind": "data"}))
    assert "topk_ids" in training_columns(_d(loss={"kind": "logit"}))
    assert "teacher_align" in training_columns(_d(loss={"kind": "logit"}))
    assert "topk_student_ids" not in training_columns(_d(loss={"kind": "logit"}))  # old shards: not read
    online = training_columns(_d(loss={"kind": "feature"}))
    assert "completion" in online and "messages" in online and "topk_ids" not in online


def test_token_f1():
    assert token_f1("the answer is 42", "42") == pytest.approx(2 * 0.25 * 1 / 1.25)
    assert token_f1("42.", "42") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert token_f1("a b", "c d") == 0.0


def test_answer_metrics_parse_the_think_block():
    completions = ["<think>\n1+1=2\n</think>\n2", "<think>unfinished", "3"]
    m = answer_metrics(completions, ["2", "2", None], ["2", "2", "4"], "numeric")
    assert m["em"] == 0.5 and m["n_with_reference"] == 2
    assert m["teacher_agreement"] == pytest.approx(1 / 3)
    assert answer_metrics([], [], [], "exact")["em"] is None


def test_gate():
    report = {"em": 0.6, "teacher_agreement": 0.8}
    assert check_gate(report, GateConfig())["passed"] is True
    res = check_gate(report, GateConfig(min_em=0.7, min_teacher_agreement=0.5))
    assert res["passed"] is False
    assert [c["passed"] for c in res["checks"]] == [False, True]
    assert check_gate({"em": None}, GateConfig(min_em=0.1))["passed"] is False  # no references: fail


def _rows():
    return [{"step": i + 1, "loss": 3.0 - i * 0.1, "ce": 2.0, "kd": 1.0, "lr": 1e-3 * (i + 1) / 5,
             "tokens": 100, "step_time_s": 10.0 if i == 0 else 0.5, "attempt": 0 if i < 4 else 1}
            for i in range(8)]


def test_steady_tokens_per_s_skips_each_attempts_start():
    rows = _rows()
    rows[4]["step_time_s"] = 20.0  # restart
    assert steady_tokens_per_s(rows, skip=1) == pytest.approx(100 / 0.5)
    assert steady_tokens_per_s(rows[:1], skip=2) is None


def test_curves_round_trip_and_png(tmp_path):
    rows = _rows()
    write_curves(rows, str(tmp_path / "c.jsonl"), str(tmp_path / "c.png"), title="t")
    assert [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()] == rows
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert render_png(rows)[:4] == b"\x89PNG"


def test_perplexity_only_for_models_that_share_the_student_tokens():
    from rayjobs.distillation.evaluate import _speaks_student_tokens

    class Tok:
        def __init__(self, offset):
            self.offset = offset

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return "".join(m["content"] for m in messages)

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) + self.offset for c in text]}

    record = {"messages": json.dumps([{"role": "user", "content": "ab"}]), "input_ids": [97, 98, 5, 6],
              "prompt_len": 2}
    assert _speaks_student_tokens(Tok(0), record)
    assert not _speaks_student_tokens(Tok(1), record)
