"""Parquet shards, rejects and the manifest at a local or s3:// location.

Layout under the output location::

    samples/part-00000.parquet   kept samples (records.SAMPLE_SCHEMA)
    rejects/part-00000.parquet   everything set aside, with the reason
    progress/part-00000.json     commit marker: prompt ids done, dedupe keys, counts, stats
    manifest.json                totals, config digest, throughput, summed stats

A shard counts only once its progress file exists (written last, atomically) and parses. Files of
a shard without one were cut off by an interruption: readers ignore them, and the resumed run
deletes them before it writes that shard again (it may write no samples, or no rejects, where the
dead run did: the stale file must not be adopted), so a resumed run neither repeats nor misses rows.
Each progress file names the config digest (generation config + record schema) it
was written under: resuming under another digest would mix two datasets, so it is
refused with ``ForeignOutput`` instead.

Each progress file also holds the shard's statistics (``datasets_pipeline.stats``), counted from
the rows as they are written, so totals come from these small files and never from the shards.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from cluster.errors import UserError
from cluster.storage import filesystem, join, read_bytes, write_bytes, write_json
from datasets_pipeline import records as R
from datasets_pipeline.stats import COLUMNS as STATS_COLUMNS
from datasets_pipeline.stats import merge_stats, shard_stats


class ForeignOutput(UserError):
    """The output location holds shards written under another config or record schema."""


@dataclass
class Progress:
    done: set[str] = field(default_factory=set)
    dedupe_keys: set[str] = field(default_factory=set)
    counts: Counter = field(default_factory=Counter)
    next_shard: int = 0


class ShardStore:
    def __init__(self, location: str, config_digest: str | None = None):
        """``config_digest``: set by the writer; progress from another digest is then refused."""
        self.location = location
        self.config_digest = config_digest
        self.fs, self.root = filesystem(location)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _read_json(self, path: str) -> dict:
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def _progress_entries(self) -> Iterator[dict]:
        """Every committed progress file's content, in shard order, one at a time (they list every
        prompt id). A file that does not parse is a commit that never finished (written by a version
        that wrote markers in place, then killed): its shard is uncommitted and written again."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._path("progress"), allow_not_found=True))
        for path in sorted(i.path for i in infos if i.path.endswith(".json")):
            try:
                yield self._read_json(path)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue

    def load_progress(self) -> Progress:
        prog = Progress()
        for entry in self._progress_entries():
            if self.config_digest and entry.get("config_digest") != self.config_digest:
                raise ForeignOutput(
                    f"{self.location} holds shards of another generation config or record schema "
                    f"(digest {entry.get('config_digest')}, this run {self.config_digest}); "
                    "set generation.output to a new location or delete the old output"
                )
            prog.done.update(entry["done"])
            prog.dedupe_keys.update(entry["dedupe_keys"])
            prog.counts.update(entry["counts"])
            prog.next_shard = max(prog.next_shard, entry["shard"] + 1)
        return prog

    def write_shard(self, shard: int, samples: list[dict], rejects: list[dict], done: list[str],
                    dedupe_keys: list[str], counts: dict) -> None:
        name = f"part-{shard:05d}"
        table = R.rows_table(samples, R.SAMPLE_SCHEMA)
        self._delete_uncommitted(name)
        if samples:
            self._write_table(f"samples/{name}.parquet", table)
        if rejects:
            self._write_table(f"rejects/{name}.parquet", pa.Table.from_pylist(rejects, schema=R.REJECT_SCHEMA))
        entry = {"shard": shard, "done": done, "dedupe_keys": dedupe_keys, "counts": dict(counts),
                 "stats": shard_stats(table), "config_digest": self.config_digest}
        write_bytes(join(self.location, "progress", f"{name}.json"), json.dumps(entry).encode(), atomic=True)

    def _delete_uncommitted(self, name: str) -> None:
        """Remove a dead run's files of shard ``name`` (it had no progress file, or a torn one)."""
        paths = [self._path(kind, f"{name}.parquet") for kind in ("samples", "rejects")]
        for info in self.fs.get_file_info(paths):
            if info.type == pafs.FileType.File:
                self.fs.delete_file(info.path)

    def _write_table(self, rel: str, table: pa.Table) -> None:
        path = self._path(*rel.split("/"))
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=self.fs, compression="zstd")

    def write_manifest(self, manifest: dict) -> None:
        write_json(join(self.location, "manifest.json"), manifest, atomic=True)

    def read_manifest(self) -> dict | None:
        data = read_bytes(join(self.location, "manifest.json"))
        return None if data is None else json.loads(data)

    def committed_stats(self) -> dict[str, dict]:
        """The committed shards' statistics, summed from their progress files.

        Progress files written before shards carried statistics have none: those shards alone are
        recounted from their Parquet (``recount_stats``).
        """
        parts, missing = [], []
        for entry in self._progress_entries():
            if "stats" in entry:
                parts.append(entry["stats"])
            else:
                missing.append(entry["shard"])
        return merge_stats(parts + ([self.recount_stats(missing)] if missing else []))

    def recount_stats(self, shards: list[int] | None = None) -> dict[str, dict]:
        """Statistics counted again from the committed sample shards (all, or those numbered ``shards``).

        The fallback for outputs older than per-shard statistics; reads eight columns of every row.
        """
        wanted = None if shards is None else {f"part-{s:05d}.parquet" for s in shards}
        files = [p for p in self.sample_files() if wanted is None or p.rsplit("/", 1)[-1] in wanted]
        return merge_stats(shard_stats(pq.read_table(p, filesystem=self.fs, columns=list(STATS_COLUMNS),
                                                     schema=R.SAMPLE_SCHEMA)) for p in files)

    def _committed(self, kind: str) -> list[str]:
        """Parquet files of `kind` whose shard has a valid progress file (others were cut off)."""
        committed = {f"part-{entry['shard']:05d}" for entry in self._progress_entries()}
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(kind), allow_not_found=True))
        return sorted(i.path for i in infos if i.base_name.removesuffix(".parquet") in committed)

    def sample_files(self) -> list[str]:
        """Committed sample shards, as paths in this store's filesystem."""
        return self._committed("samples")

    def _read(self, kind: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        files = self._committed(kind)
        if not files:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        return pa.concat_tables(pq.read_table(p, filesystem=self.fs, columns=columns, schema=schema) for p in files)

    def read_samples(self, columns: list[str] | None = None) -> pa.Table:
        return self._read("samples", R.SAMPLE_SCHEMA, columns)

    def read_rejects(self) -> pa.Table:
        return self._read("rejects", R.REJECT_SCHEMA)
