"""Generation's preflight: the input is there and its first rows fit the column mapping, the
output can be written and is not another config's. No Ray: this runs before anything starts.

Reads at most ``SAMPLE_ROWS`` rows (the first lines of the first JSONL file, or the first record
batch of the first Parquet file), through the same ``prompts.to_prompt`` the pipeline applies,
so a mapping that matches no row is reported in a second instead of as a run of rejects. With
``response_field`` a row must hold a response too.
"""

from __future__ import annotations

import os

from pyarrow import fs as pafs

from cluster.storage import filesystem, is_s3
from datasets_pipeline.config import InputConfig
from datasets_pipeline.prompts import Rejected, parse_json_line, to_prompt, to_response
from datasets_pipeline.shards import ForeignOutput, ShardStore
from datasets_pipeline.sources import detect_format

SAMPLE_ROWS = 20


def _first_file(fs, path: str, suffixes: tuple[str, ...]) -> str | None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return path
    if info.type != pafs.FileType.Directory:
        return None
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith(suffixes))
    return files[0] if files else None


def _sample_rows(cfg: InputConfig, path: str, fmt: str) -> list[dict]:
    fs, root = filesystem(path)
    if fmt == "jsonl":
        first = _first_file(fs, root, (".jsonl", ".json"))
        if first is None:
            raise FileNotFoundError(f"no .jsonl file in {path}")
        with fs.open_input_stream(first) as f:
            lines = [line for line in f.read(1 << 20).split(b"\n") if line.strip()][:SAMPLE_ROWS]
        rows = []
        for line in lines:
            try:
                rows.append(parse_json_line(line))
            except Rejected:
                continue
        return rows
    import pyarrow.parquet as pq

    first = _first_file(fs, root, (".parquet",))
    if first is None:
        raise FileNotFoundError(f"no .parquet file in {path}")
    with fs.open_input_file(first) as f:
        batch = next(pq.ParquetFile(f).iter_batches(batch_size=SAMPLE_ROWS), None)
    return batch.to_pylist() if batch is not None else []


def check_input(cfg: InputConfig, path: str) -> list[str]:
    """Problems with the input at ``path`` (resolved), one line each; [] when the first rows parse."""
    if not is_s3(path) and not os.path.exists(path):
        return [f"not found ({path})"]
    try:
        fmt = detect_format(path, cfg.format)
        if fmt == "hf_disk":
            return [] if os.path.exists(os.path.join(path, "dataset_info.json")) else [f"no dataset_info.json in {path}"]
        rows = _sample_rows(cfg, path, fmt)
    except (OSError, ValueError) as e:
        return [f"cannot read {path} ({str(e).splitlines()[0]})"]
    if not rows:
        return [f"no rows in {path}"]
    reasons = []
    for row in rows:
        try:
            to_prompt(row, cfg)
            if cfg.response_field:
                to_response(row, cfg)
            return []
        except Rejected as e:
            reasons.append(str(e))
    keys = sorted({k for row in rows for k in row})
    return [f"none of the first {len(rows)} rows fits the column mapping: {reasons[0]} (row keys: {keys})"]


def check_output(location: str, config_digest: str) -> list[str]:
    """The output can be created, and any shards already there belong to this config."""
    try:
        fs, root = filesystem(location)
        if is_s3(location):
            bucket = root.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                return [f"bucket s3://{bucket} does not exist"]
        else:
            parent = os.path.abspath(location)
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.access(parent, os.W_OK):
                return [f"cannot write under {parent}"]
        ShardStore(location, config_digest).load_progress()
    except ForeignOutput as e:
        return [str(e)]
    except OSError as e:
        return [f"cannot use {location} ({str(e).splitlines()[0]})"]
    return []
