"""What flows between stages: the one definition of a generated training sample.

The generation stage writes these columns to Parquet; the training stage reads
them back by the same names. Teacher top-k logprobs are stored flat
(``num_teacher_tokens * topk_k`` entries, token-major) as int32 ids and float16
logprobs: 6 bytes per entry instead of a Python dict's text, and Arrow can hand
them to torch without a per-token Python loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),  # prompt_id + "/" + sample index
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int16(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # "train" | "val"
        pa.field("messages", pa.string(), nullable=False),  # prompt chat messages, JSON
        pa.field("reference", pa.string()),  # reference answer, when the source has one
        pa.field("completion", pa.string(), nullable=False),  # teacher text as generated
        pa.field("reasoning", pa.string()),  # the <think> trace, parsed out
        pa.field("answer", pa.string(), nullable=False),  # the final answer, parsed out
        pa.field("verified", pa.bool_()),  # null when there is no reference
        pa.field("teacher_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_k", pa.int16(), nullable=False),  # 0 when logprobs were off
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.float16()), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # student tokens, prompt + target
        pa.field("prompt_len", pa.int32(), nullable=False),  # student prompt tokens (loss-masked)
        # Index in input_ids where teacher_token_ids start verbatim (same tokenizer, reasoning
        # kept); -1 when the student's tokens differ and top-k must be aligned across tokenizers.
        pa.field("teacher_offset", pa.int32(), nullable=False),
        # Cross-tokenizer alignment (datasets_pipeline.alignment), empty when teacher_offset >= 0 or
        # the texts could not be aligned: per student target token (input_ids[prompt_len:]), the
        # index of the teacher token starting at the same character, -1 if none.
        # The teacher's top-k ids are mapped to student ids at training time (the collate, through
        # datasets_pipeline.vocab_cache), not stored: +4 bytes per entry, 80 per token at k = 20.
        pa.field("teacher_align", pa.list_(pa.int32()), nullable=False),
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # prompt_id, sample_id or file:line
        # input | prompt | response | engine | preprocess | filter | assemble
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),  # truncated raw row or error text
    ]
)

SAMPLE_COLUMNS = tuple(SAMPLE_SCHEMA.names)
# The per-token columns: O(tokens) values per row, the rest are O(1).
TOKEN_COLUMNS = ("teacher_token_ids", "topk_ids", "topk_logprobs", "input_ids", "teacher_align")


def table_rows(table: pa.Table) -> Iterator[dict]:
    """A block's rows as dicts, the per-token lists as NumPy views into the block (no Python int or
    float per token: the driver handles every row, and shards are written back from these arrays)."""
    columns = {}
    for name in table.column_names:
        arr = table.column(name).combine_chunks()
        if name in TOKEN_COLUMNS and pa.types.is_list(arr.type):
            offsets = arr.offsets.to_numpy()
            values = arr.flatten().to_numpy(zero_copy_only=False)  # flatten() honours a slice's offset
            columns[name] = [values[a:b] for a, b in zip(offsets[:-1] - offsets[0], offsets[1:] - offsets[0])]
        else:
            columns[name] = arr.to_pylist()
    for i in range(table.num_rows):
        yield {name: col[i] for name, col in columns.items()}


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """``pa.Table.from_pylist``, with the per-token columns built by concatenating arrays.

    ``from_pylist`` converts a NumPy value element by element: about 19 µs per generated token
    at k = 20 on the 2-core machine, more than the rest of the row's handling together.
    """
    missing = sorted({f.name for f in schema for r in rows if f.name not in r})
    if missing:
        raise ValueError(f"rows lack the schema's fields {missing}: build them with every field of the schema")
    arrays = []
    for f in schema:
        values = [r[f.name] for r in rows]
        if f.name in TOKEN_COLUMNS:
            dtype = f.type.value_type.to_pandas_dtype()
            parts = [np.asarray(v, dtype) for v in values]
            offsets = np.zeros(len(parts) + 1, np.int32)
            np.cumsum([len(p) for p in parts], out=offsets[1:])
            flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, f.type.value_type)))
        else:
            arrays.append(pa.array(values, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)

# Filter reasons, counted in the manifest under these names.
TRUNCATED = "truncated"
TOO_LONG_FOR_STUDENT = "too_long_for_student"
DUPLICATE = "duplicate"
UNVERIFIED = "unverified"
NOT_BEST = "not_best_of_n"
ENGINE_ERROR = "engine_error"
PREPROCESS_ERROR = "preprocess_error"
CHAT_TEMPLATE = "chat_template"  # the teacher's chat template refused the prompt's messages
INCOMPLETE_SAMPLES = "incomplete_samples"  # the stream ended before all n samples of the prompt came
MISSING_RESPONSE = "missing_response"  # input.response_field: the row has no response (or not a string)
EMPTY_RESPONSE = "empty_response"  # input.response_field: the response is empty or blank
