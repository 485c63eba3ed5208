"""Per-shard statistics: counted from the rows at commit, summed from the progress files, read by
distillation's ``data_stats``."""

import json

import pyarrow as pa

from datasets_pipeline import records as R
from datasets_pipeline.shards import ShardStore
from datasets_pipeline.stats import merge_stats, rows_over, shard_stats, total


def sample(i: int, split: str = "train", *, n_tok: int = 3, k: int = 2, offset: int = 4, align: int = 0,
           length: int = 10) -> dict:
    return {
        "sample_id": f"p{i}/0", "prompt_id": f"p{i}", "sample_index": 0, "split": split, "messages": "[]",
        "reference": None, "completion": "c", "reasoning": None, "answer": "a", "verified": None,
        "teacher_token_ids": list(range(n_tok)), "topk_k": k, "topk_ids": [1] * (k * n_tok),
        "topk_logprobs": [-0.5] * (k * n_tok), "input_ids": list(range(length)), "prompt_len": 4,
        "teacher_offset": offset, "teacher_align": [0] * align,
    }


ROWS = [
    sample(0),                                   # same tokenizer: top-k usable
    sample(1, offset=-1, align=5, length=12),    # cross-tokenizer, aligned
    sample(2, offset=-1, align=0, length=12),    # cross-tokenizer, not aligned: no usable top-k
    sample(3, k=0, length=30),                   # logprobs off
    sample(4, "val", n_tok=5, length=30),
]


def table(rows) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=R.SAMPLE_SCHEMA)


def test_shard_stats_count_per_split():
    stats = {split: {k: v for k, v in s.items() if not k.startswith("teacher_")}  # test_diagnostics.py's
             for split, s in shard_stats(table(ROWS)).items()}
    assert stats["train"] == {
        "rows": 4, "generated_tokens": 12, "topk_bytes": 3 * 6 * 6 + 4 * 8,
        "with_teacher_topk": 2, "xtok": 1, "input_lengths": {"10": 1, "12": 2, "30": 1},
    }
    assert stats["val"] == {"rows": 1, "generated_tokens": 5, "topk_bytes": 10 * 6 + 8, "with_teacher_topk": 1,
                            "xtok": 0, "input_lengths": {"30": 1}}
    assert shard_stats(table([])) == {}


def test_topk_bytes_are_the_arrow_size_of_the_two_columns():
    t = table(ROWS)
    assert total(shard_stats(t), "topk_bytes") == t["topk_ids"].nbytes + t["topk_logprobs"].nbytes


def test_merged_stats_equal_the_stats_of_all_rows():
    parts = [shard_stats(table(ROWS[:2])), shard_stats(table(ROWS[2:]))]
    assert merge_stats(parts) == shard_stats(table(ROWS))
    assert merge_stats([]) == {}


def test_rows_over_a_context_limit_come_from_the_length_histogram():
    stats = shard_stats(table(ROWS))
    assert rows_over(stats, 11) == 4 and rows_over(stats, 11, ["train"]) == 3
    assert rows_over(stats, 30) == 0 and rows_over(stats, 9) == 5


# ROWS: train lengths 10, 12, 12, 30 (2 with usable top-k, 1 of them cross-tokenizer); val 30.
EXPECTED = {"train": 4, "val": 1, "with_teacher_topk": 3, "xtok": 1, "over_context": 2, "over_context_train": 1}


def _write(tmp_path) -> ShardStore:
    """ROWS in two committed shards, no manifest."""
    store = ShardStore(str(tmp_path), "abc")
    store.write_shard(0, ROWS[:3], [], ["p0", "p1", "p2"], [], {"kept": 3})
    store.write_shard(1, ROWS[3:], [], ["p3", "p4"], [], {"kept": 2})
    return store


def _drop_stats(tmp_path, shards=None) -> None:
    """Make progress files look as written before shards carried statistics."""
    for path in (tmp_path / "progress").glob("*.json"):
        entry = json.loads(path.read_text())
        if shards is None or entry["shard"] in shards:
            del entry["stats"]
            path.write_text(json.dumps(entry))


def test_progress_files_carry_the_stats_and_the_store_sums_them(tmp_path):
    store = _write(tmp_path)
    entry = json.loads((tmp_path / "progress" / "part-00001.json").read_text())
    assert entry["stats"] == shard_stats(table(ROWS[3:]))
    assert store.committed_stats() == shard_stats(table(ROWS)) == store.recount_stats()


def test_progress_files_without_stats_are_recounted_from_their_shard(tmp_path):
    store = _write(tmp_path)
    _drop_stats(tmp_path, [0])
    assert store.recount_stats([0]) == shard_stats(table(ROWS[:3]))
    assert store.committed_stats() == shard_stats(table(ROWS))


def test_without_a_manifest_the_progress_files_are_summed(tmp_path):
    from rayjobs.distill import data_stats

    _write(tmp_path)
    assert data_stats(str(tmp_path), context_limit=20) == EXPECTED


def test_the_manifest_statistics_are_used_when_present(tmp_path):
    from rayjobs.distill import data_stats

    store = _write(tmp_path)
    # A manifest that disagrees with the shards shows which one was read.
    store.write_manifest({"complete": True, "stats": shard_stats(table(ROWS[3:]))})
    assert data_stats(str(tmp_path), context_limit=20) == {
        "train": 1, "val": 1, "with_teacher_topk": 1, "xtok": 0, "over_context": 2, "over_context_train": 1}


def test_old_outputs_without_statistics_are_recounted(tmp_path):
    from rayjobs.distill import data_stats

    store = _write(tmp_path)
    store.write_manifest({"complete": True, "rows": {"train": 4, "val": 1}})
    _drop_stats(tmp_path)
    assert data_stats(str(tmp_path), context_limit=20) == EXPECTED
