"""Stored top-k at the real R1 -> Qwen vocabularies: ids above 65,535 survive the shards exactly, map to
Qwen ids above 65,535, and what a row stores of its top-k (the manifest's ``topk_bytes_per_token``)
at k = 20 stays within 8 k + 16 bytes and 1% of dense."""

import numpy as np
import pyarrow as pa

from datasets_pipeline import records as R
from datasets_pipeline.shards import ShardStore
from datasets_pipeline.alignment import map_ids
from datasets_pipeline.stats import shard_stats, total
from datasets_pipeline.topk import compact_topk

K = 20
TRACE = "<think>\n计算 4821 + 397：个位 1+7=8，十位 2+9=11 进 1 😀 …\n</think>\n答案是 5218。"


def _rows(r1, qwen, n_rows: int = 8) -> list[dict]:
    """Rows as generation writes them: the teacher's real R1 ids, k = 20 alternatives a third of them
    above 65,535 (cross-tokenizer: mapped to Qwen ids only when training reads them)."""
    rng = np.random.default_rng(0)
    teacher_ids = r1.encode(TRACE * 4, add_special_tokens=False) + [r1.eos_token_id]
    rows = []
    for i in range(n_rows):
        per_token = []
        for tok in teacher_ids:
            alternatives = rng.integers(65_536, len(r1), K - 1)
            per_token.append({int(tok): {"logprob": -0.1},
                              **{int(a): {"logprob": -3.0 - j} for j, a in enumerate(alternatives)}})
        ids, lps = compact_topk(per_token, K)
        student = qwen.encode(TRACE * 4, add_special_tokens=False) + [qwen.eos_token_id]
        rows.append({
            "sample_id": f"p{i}/0", "prompt_id": f"p{i}", "sample_index": 0, "split": "train", "messages": "[]",
            "reference": None, "completion": TRACE * 4, "reasoning": None, "answer": "5218", "verified": None,
            "teacher_token_ids": teacher_ids, "topk_k": K, "topk_ids": ids, "topk_logprobs": lps,
            "input_ids": student, "prompt_len": 0, "teacher_offset": -1,
            "teacher_align": list(range(len(student))),
        })
    return rows


def test_topk_bytes_per_token_at_the_real_vocabulary(r1, qwen, r1_qwen_map, tmp_path):
    mapping, _ = r1_qwen_map
    rows = _rows(r1, qwen)
    store = ShardStore(str(tmp_path / "out"), "digest")
    store.write_shard(0, rows, [], [r["prompt_id"] for r in rows], [], {"kept": len(rows)})
    back = store.read_samples(["topk_ids"])
    for row, ids in zip(rows, back["topk_ids"].to_pylist(), strict=True):
        assert ids == row["topk_ids"].tolist()
    assert max(max(r) for r in back["topk_ids"].to_pylist()) > 65_535
    mapped = [map_ids(mapping, ids) for ids in back["topk_ids"].to_pylist()]
    assert max(m.max() for m in mapped) > 65_535  # Qwen ids past int16/uint16
    # Per token, the shards hold top-k in these two columns only (no mapped copy).
    assert [f.name for f in R.SAMPLE_SCHEMA if f.name.startswith("topk_")] == ["topk_k", "topk_ids", "topk_logprobs"]
    stats = shard_stats(pa.Table.from_pylist(rows, schema=R.SAMPLE_SCHEMA))
    per_token = total(stats, "topk_bytes") / total(stats, "generated_tokens")
    dense = 2 * len(r1)  # one float16 logprob per teacher id
    print(f"top-k {per_token:.2f} B/token at k={K} (limit {8 * K + 16}, dense {dense}), cross-tokenizer rows included")
    assert per_token <= 8 * K + 16 and per_token <= 0.01 * dense
