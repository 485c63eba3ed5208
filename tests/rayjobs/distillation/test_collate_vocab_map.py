"""Cross-tokenizer top-k ids are mapped to student ids in the collate, not stored: the collated teacher
equals what the shards' former ``topk_student_ids`` column gave, on a real saved tokenizer pair."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from datasets_pipeline import records as R
from datasets_pipeline.alignment import map_ids
from datasets_pipeline.stages import StudentStage
from datasets_pipeline.vocab_cache import cached_vocab_map
from rayjobs.distillation.batch_loss import collate_vocab_map
from rayjobs.distillation.collate import CollateSettings, collate
from rayjobs.distillation.xtok import aligned_teacher_xtok

K = 4


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return AutoTokenizer.from_pretrained(tiny_pair["teacher"]), AutoTokenizer.from_pretrained(tiny_pair["student"])


def _rows(tiny_pair, teacher, n: int = 6) -> dict:
    """Generation-stage rows (its own ``StudentStage``) with top-k over the whole teacher vocabulary."""
    cfg = {"teacher": tiny_pair["teacher"], "input": {"path": "unused"}, "output": "unused",
           "sampling": {"logprobs_topk": K, "max_new_tokens": 96}}
    stage = StudentStage(cfg, tiny_pair["teacher"], tiny_pair["student"])
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        a, b = rng.integers(10, 999, 2)
        completion = f"<think>\n{a}+{b}  =\n\n{a + b}\n</think>\n{a + b}"
        tokens = teacher(completion, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
        ids = np.stack([tokens, *rng.integers(0, len(teacher), (K - 1, len(tokens)))], 1)
        lps = np.sort(rng.normal(-3, 1, (len(tokens), K)), 1)[:, ::-1]
        out = stage({"prompt_id": f"p{i}", "sample_id": f"p{i}/0", "sample_index": 0, "split": "train",
                     "messages": json.dumps([{"role": "user", "content": f"What is {a} + {b}?"}]),
                     "reference": str(a + b), "generated_text": completion,
                     "generated_tokens": np.asarray(tokens, np.int32),
                     "topk_ids": ids.astype(np.int32).reshape(-1), "topk_logprobs": lps.astype(np.float16).reshape(-1)})
        assert out["status"] == "ok" and out["teacher_offset"] == -1 and out["teacher_align"], out
        rows.append({k: out[k] for k in R.SAMPLE_COLUMNS})
    return {c: [r[c] for r in rows] for c in rows[0]}


def test_collate_maps_ids_as_the_stored_column_did(tiny_pair, pair):
    teacher, student = pair
    batch = _rows(tiny_pair, teacher)
    assert "topk_student_ids" not in batch  # the shards no longer carry it
    vocab_map = collate_vocab_map("vocab_map", teacher, student)
    # What generation used to store: every top-k id through the pair's cached map.
    stored = [map_ids(cached_vocab_map(teacher, student), ids) for ids in batch["topk_ids"]]
    out = collate(batch, CollateSettings(pad_id=0, max_seq_len=256, vocab_map=vocab_map))
    mapped_rows = 0
    for r, old in enumerate(stored):
        length = len(batch["input_ids"][r])
        ids, lps, mask = aligned_teacher_xtok(length, batch["prompt_len"][r], batch["teacher_align"][r], K, K, old,
                                              batch["topk_logprobs"][r])
        assert torch.equal(out["teacher_ids"][r, :length], torch.from_numpy(ids))
        assert torch.equal(out["teacher_logprobs"][r, :length], torch.from_numpy(lps))
        assert torch.equal(out["teacher_mask"][r, :length], torch.from_numpy(mask))
        mapped_rows += int(mask.any())
    assert mapped_rows == len(stored)


def test_no_map_for_uld_or_the_same_vocabulary(tiny_pair, pair):
    teacher, student = pair
    assert collate_vocab_map("uld", teacher, student) is None
    assert collate_vocab_map("vocab_map", teacher, AutoTokenizer.from_pretrained(tiny_pair["teacher"])) is None
    assert collate_vocab_map("vocab_map", None, student) is None
