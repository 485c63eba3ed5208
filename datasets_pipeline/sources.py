"""Read prompt sources into rows of ``{"source": where, "raw": bytes}``, never failing on content.

Parsing happens later, per row, so one bad line is a counted reject instead of a
crashed read: JSONL is read as bytes and split into lines here (Ray's JSON reader
would abort the whole file on the first bad line or invalid UTF-8).
"""

from __future__ import annotations

import hashlib
import json
import os

from cluster.ray_data import read_parquet
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
        {"source": f"{name}:{i}", "raw": line}
        for i, line in enumerate(row["bytes"].split(b"\n"), start=1)
        if line.strip()
    ]


def _encode_row(row: dict) -> dict:
    blob = json.dumps(row, default=str, ensure_ascii=False).encode()
    return {"source": "row#" + hashlib.sha256(blob).hexdigest()[:16], "raw": blob}


def read_source(cfg: InputConfig, path: str):
    """-> ray.data.Dataset of {source, raw}."""
    import ray.data

    fmt = detect_format(path, cfg.format)
    fs, fs_path = filesystem(path)
    if fmt == "jsonl":
        ds = ray.data.read_binary_files(fs_path, filesystem=fs, include_paths=True)
        ds = ds.flat_map(_split_lines)
    elif fmt == "parquet":
        ds = read_parquet(fs_path, filesystem=fs).map(_encode_row)
    else:
        if path.startswith("s3://"):
            raise ValueError("hf_disk input must be a local directory; export it to Parquet for s3://")
        import datasets

        ds = ray.data.from_huggingface(datasets.load_from_disk(path)).map(_encode_row)
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    return ds
