"""StudentStage on a teacher with another tokenizer: the stored cross-tokenizer alignment."""

import json
import math

import numpy as np

from datasets_pipeline.alignment import map_ids
from datasets_pipeline.stages import StudentStage
from datasets_pipeline.vocab_cache import cached_vocab_map

COMPLETION = "<think>\n7+5+0=12\n4+8+1=13\n</think>\n132"


def test_map_ids_keeps_padding():
    assert map_ids(np.array([5, 6, 7], np.int32), [2, -1, 0, 9]).tolist() == [7, -1, 5, -1]


def test_cross_tokenizer_rows_carry_alignment_and_teacher_topk(tok_dirs):
    teacher_dir, student_dir, teacher, student = tok_dirs
    cfg = {"teacher": teacher_dir, "input": {"path": "x.jsonl"}, "output": "out",
           "sampling": {"logprobs_topk": 2, "max_new_tokens": 64}}
    stage = StudentStage(cfg, teacher_dir, student_dir)
    assert not stage.aligned
    tokens = teacher(COMPLETION, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    topk = [[t, (t + 1) % len(teacher)] for t in tokens]
    row = {"prompt_id": "p", "sample_id": "p/0", "sample_index": 0, "split": "train",
           "messages": json.dumps([{"role": "user", "content": "What is 47 + 85?"}]), "reference": "132",
           "generated_text": COMPLETION, "generated_tokens": np.asarray(tokens, np.int32),
           "topk_ids": np.asarray(topk, np.int32).reshape(-1),
           "topk_logprobs": np.asarray([[math.log(0.9), math.log(0.05)]] * len(tokens), np.float16).reshape(-1)}
    out = stage(row)
    assert out["status"] == "ok" and out["teacher_offset"] == -1
    target = out["input_ids"][out["prompt_len"]:]
    assert len(out["teacher_align"]) == len(target) and out["teacher_align"][-1] == len(tokens) - 1
    assert "topk_student_ids" not in out  # mapped at training time (the collate), not stored
    mapped = map_ids(cached_vocab_map(teacher, student), out["topk_ids"]).reshape(-1, 2)
    # Where a student token is aligned with a teacher token of the same text, the teacher's top-1
    # (the token it generated) maps to exactly that student token.
    same = [(i, j) for i, j in enumerate(out["teacher_align"])
            if j >= 0 and student.decode([target[i]]) == teacher.decode([tokens[j]])]
    assert len(same) >= len(target) // 2
    assert all(mapped[j, 0] == target[i] for i, j in same)


def test_engine_errors_carry_the_full_request_prompt_for_the_retry(tok_dirs):
    from datasets_pipeline.targets import render_prompt

    teacher_dir, _, teacher, _ = tok_dirs
    cfg = {"teacher": teacher_dir, "input": {"path": "x.jsonl"}, "output": "out"}
    stage = StudentStage(cfg, teacher_dir, teacher_dir)
    messages = [{"role": "user", "content": "1 + " * 400}]
    base = {"prompt_id": "p", "sample_id": "p/0", "sample_index": 0, "split": "train",
            "messages": json.dumps(messages), "reference": None}
    # What Ray's engine stage leaves in an error row: the prompt cut to 500 characters.
    failed = stage({**base, "prompt": "cut...[truncated]", "generated_text": "", "generated_tokens": None,
                    "__inference_error__": "ValueError: prompt too long"})
    assert failed["status"] == "engine_error" and failed["prompt"] == render_prompt(teacher, messages)
    ok = stage({**base, "generated_text": "2", "generated_tokens": np.asarray([5], np.int32)})
    broken = stage({**base, "generated_text": None})
    # Ray Data builds blocks from these rows: every outcome has the same columns.
    assert ok["status"] == "ok" and ok["prompt"] == "" and broken["status"] == "preprocess_error"
    assert set(ok) == set(failed) == set(broken)
