"""What a shard holds, counted once when it is committed, so nobody reads the shards back to count.

The generation driver used to read every committed shard's token and top-k columns back just to
total them for the manifest, and distillation read five columns of every row to plan its steps.
Each shard's statistics now ride in its progress file; the manifest sums those small files.

Statistics are per split (``train``, ``val``)::

    rows               samples kept
    generated_tokens   teacher tokens (len(teacher_token_ids))
    topk_bytes         Arrow size of the two top-k columns: 4 bytes per id (int32), 2 per logprob
                       (float16), and one 4-byte offset per row in each column: all the top-k a
                       row stores (cross-tokenizer rows too: their ids are mapped to student ids
                       at training time, not stored)
    with_teacher_topk  rows whose teacher top-k reaches student positions: topk_k > 0 and either the
                       same tokenizer (teacher_offset >= 0) or a cross-tokenizer alignment
    xtok               of those, the cross-tokenizer ones (teacher_offset < 0, teacher_align non-empty)
    input_lengths      histogram of len(input_ids): {"length": rows}, keys as strings (JSON objects)
    teacher_*          the teacher's certainty over the stored top-k (datasets_pipeline.diagnostics)

Pure: pyarrow only, no Ray, so it runs on the driver as a shard is written and in unit tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from datasets_pipeline.diagnostics import teacher_stats

COLUMNS = ("split", "teacher_token_ids", "topk_k", "topk_ids", "topk_logprobs", "teacher_offset",
           "teacher_align", "input_ids")
SPLITS = ("train", "val")
_OFFSET_BYTES = 4  # one int32 offset per row per list column, as Arrow stores a list<...> column


def _total(values) -> int:
    return int(pc.sum(values).as_py() or 0)


def _lengths(column) -> pa.Array:
    return pc.fill_null(pc.list_value_length(column), 0)


def _split_stats(table: pa.Table) -> dict:
    """The statistics of rows that all belong to one split."""
    xtok = pc.and_(pc.less(table["teacher_offset"], 0), pc.greater(_lengths(table["teacher_align"]), 0))
    has_topk = pc.greater(table["topk_k"], 0)
    usable = pc.and_(has_topk, pc.or_(pc.greater_equal(table["teacher_offset"], 0), xtok))
    lengths = pc.value_counts(_lengths(table["input_ids"])).to_pylist()
    return {
        "rows": table.num_rows,
        "generated_tokens": _total(_lengths(table["teacher_token_ids"])),
        "topk_bytes": 4 * _total(_lengths(table["topk_ids"])) + 2 * _total(_lengths(table["topk_logprobs"]))
        + 2 * _OFFSET_BYTES * table.num_rows,
        "with_teacher_topk": _total(pc.cast(usable, pa.int64())),
        "xtok": _total(pc.cast(pc.and_(has_topk, xtok), pa.int64())),
        "input_lengths": {str(v["values"]): v["counts"] for v in sorted(lengths, key=lambda v: v["values"])},
        **teacher_stats(table),
    }


def shard_stats(table: pa.Table) -> dict[str, dict]:
    """Per split, the statistics of one shard's samples (a table with at least ``COLUMNS``)."""
    splits = sorted(set(table["split"].to_pylist())) if table.num_rows else []
    return {split: _split_stats(table.filter(pc.equal(table["split"], split))) for split in splits}


def merge_stats(parts: Iterable[dict[str, dict]]) -> dict[str, dict]:
    """The statistics of several shards together: counts add up, histograms add up bin by bin."""
    merged: dict[str, dict] = {}
    for part in parts:
        for split, stats in part.items():
            into = merged.setdefault(split, {})
            for key, value in stats.items():
                if isinstance(value, dict):
                    into[key] = dict(Counter(into.get(key, {})) + Counter(value))
                else:
                    into[key] = into.get(key, 0) + value
    for stats in merged.values():
        stats["input_lengths"] = dict(sorted(stats.get("input_lengths", {}).items(), key=lambda kv: int(kv[0])))
    return merged


def total(stats: dict[str, dict], key: str, splits: Iterable[str] | None = None) -> int:
    """``key`` summed over ``splits`` (all splits by default)."""
    return sum(s.get(key, 0) for split, s in stats.items() if splits is None or split in splits)


def rows_over(stats: dict[str, dict], limit: int, splits: Iterable[str] | None = None) -> int:
    """Rows longer than ``limit`` student tokens, in ``splits`` (all splits by default)."""
    return sum(count for split, s in stats.items() if splits is None or split in splits
               for length, count in s.get("input_lengths", {}).items() if int(length) > limit)
