"""Read prompt sources into rows of ``{"source": where, "raw": bytes, "error": str | None}``,
never failing on content.

Parsing happens later, per row, so one bad line is a counted reject instead of a
crashed read: JSONL is read as bytes and split into lines here (Ray's JSON reader
would abort the whole file on the first bad line or invalid UTF-8). Parquet files and a
``datasets`` save_to_disk directory's Arrow files are likewise read one file at a time, each
row as JSON: Ray's Parquet reader and ``load_from_disk`` failed the whole job on one corrupt
file or on files whose schemas differ. A file (or a part of one) that cannot be read becomes
one row with ``error`` set, which the reject pass records like a bad line.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.storage import filesystem
from datasets_pipeline.config import InputConfig


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    base = path.rstrip("/")
    if base.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if base.endswith(".parquet"):
        return "parquet"
    if os.path.isdir(base) and os.path.exists(os.path.join(base, "dataset_info.json")):
        return "hf_disk"
    if os.path.isdir(base):
        names = os.listdir(base)
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        if any(n.endswith((".jsonl", ".json")) for n in names):
            return "jsonl"
    raise ValueError(f"cannot tell the format of input '{path}': set generation.input.format")


def _split_lines(row: dict) -> list[dict]:
    name = os.path.basename(row["path"])
    return [
        {"source": f"{name}:{i}", "raw": line, "error": None}
        for i, line in enumerate(row["bytes"].split(b"\n"), start=1)
        if line.strip()
    ]


def _record_batches(data: bytes, fmt: str):
    """A Parquet file's row groups, or an Arrow IPC stream's (save_to_disk) record batches."""
    buf = pa.BufferReader(data)
    if fmt == "parquet":
        pf = pq.ParquetFile(buf)
        return (pf.read_row_group(i) for i in range(pf.num_row_groups))
    return iter(pa.ipc.open_stream(buf))


def _table_rows(row: dict, fmt: str) -> list[dict]:
    """One file's rows as ``{source: name:row, raw: JSON}``; what cannot be read, as one error row.

    Rows read before a corrupt row group (or record batch) are kept; the rest of the file is the
    error row, whose source names the first row it lost.
    """
    name = os.path.basename(row["path"])
    out: list[dict] = []
    try:
        for batch in _record_batches(row["bytes"], fmt):
            for record in batch.to_pylist():
                blob = json.dumps(record, default=str, ensure_ascii=False).encode()
                out.append({"source": f"{name}:{len(out) + 1}", "raw": blob, "error": None})
    except (pa.ArrowException, OSError, ValueError) as e:
        what = "Parquet" if fmt == "parquet" else "Arrow"
        detail = f"unreadable {what} file: {type(e).__name__}: {e}"
        out.append({"source": f"{name}:{len(out) + 1}", "raw": b"", "error": detail[:300]})
    return out


def read_source(cfg: InputConfig, path: str):
    """-> ray.data.Dataset of {source, raw, error}."""
    import ray.data

    fmt = detect_format(path, cfg.format)
    fs, fs_path = filesystem(path)
    if fmt == "jsonl":
        ds = ray.data.read_binary_files(fs_path, filesystem=fs, include_paths=True).flat_map(_split_lines)
    else:
        ext = "parquet" if fmt == "parquet" else "arrow"
        ds = ray.data.read_binary_files(fs_path, filesystem=fs, include_paths=True, file_extensions=[ext])
        ds = ds.flat_map(_table_rows, fn_kwargs={"fmt": fmt})
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    return ds
