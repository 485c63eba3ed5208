"""Parquet and save_to_disk inputs read file by file: bad files and rows are rejects, not a failed job."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasets_pipeline.config import GenerationConfig
from datasets_pipeline.sources import _table_rows, read_source
from datasets_pipeline import stages

GOOD = [{"id": f"g{i}", "messages": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
        for i in range(5)]


def _parquet_dir(root):
    """a_good (two row groups), b_corrupt (a cut-off file), c_other (another schema)."""
    root.mkdir()
    pq.write_table(pa.Table.from_pylist(GOOD), root / "a_good.parquet", row_group_size=3)
    pq.write_table(pa.Table.from_pylist(GOOD), root / "b_corrupt.parquet")
    data = (root / "b_corrupt.parquet").read_bytes()
    (root / "b_corrupt.parquet").write_bytes(data[: len(data) // 2])
    pq.write_table(pa.Table.from_pylist([{"question": "1 + 1?", "n": 1}, {"question": "2 + 2?", "n": 2}]),
                   root / "c_other.parquet")
    return root


def _cfg(path) -> dict:
    return GenerationConfig(teacher="t", input={"path": str(path)}, output="out").model_dump(mode="json")


class PlainTemplate:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(m["content"] for m in messages)


@pytest.fixture(autouse=True)
def _teacher(monkeypatch):
    monkeypatch.setattr(stages, "_load_tokenizer", lambda path: PlainTemplate())


def _rejects(rows, path) -> dict[str, str]:
    check = stages.InputRejects(_cfg(path), "teacher")
    return {r["source"]: r["reason"] for row in rows for r in check(row)}


def _file_rows(path, fmt="parquet") -> list[dict]:
    return _table_rows({"path": str(path), "bytes": path.read_bytes()}, fmt)


def test_a_corrupt_file_and_another_schema_are_rejects_and_good_rows_stay(tmp_path):
    root = _parquet_dir(tmp_path / "in")
    good = _file_rows(root / "a_good.parquet")
    assert [r["source"] for r in good] == [f"a_good.parquet:{i}" for i in range(1, 6)]
    assert [json.loads(r["raw"])["id"] for r in good] == [g["id"] for g in GOOD]
    assert _rejects(good, root) == {}
    corrupt = _rejects(_file_rows(root / "b_corrupt.parquet"), root)
    assert list(corrupt) == ["b_corrupt.parquet:1"] and "unreadable Parquet file" in corrupt["b_corrupt.parquet:1"]
    other = _rejects(_file_rows(root / "c_other.parquet"), root)
    assert other == {"c_other.parquet:1": "missing field 'messages'", "c_other.parquet:2": "missing field 'messages'"}


def test_a_corrupt_save_to_disk_file_is_a_reject(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(GOOD).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    first, second = sorted((tmp_path / "ds").glob("*.arrow"))
    second.write_bytes(second.read_bytes()[:100])
    assert _rejects(_file_rows(first, "hf_disk"), tmp_path / "ds") == {}
    assert len(_file_rows(first, "hf_disk")) == 3
    lost = _rejects(_file_rows(second, "hf_disk"), tmp_path / "ds")
    assert list(lost.values())[0].startswith("unreadable Arrow file")


@pytest.mark.slow
def test_read_source_over_a_directory_with_a_bad_file_keeps_the_good_ones(tmp_path, ray_local):
    """Ray's whole-directory Parquet read failed the job on the corrupt file (and on the schemas)."""
    root = _parquet_dir(tmp_path / "in")
    cfg = GenerationConfig.model_validate(_cfg(root))
    rows = read_source(cfg.input, str(root)).take_all()
    assert sorted(r["source"] for r in rows if not r["error"]) == sorted(
        [f"a_good.parquet:{i}" for i in range(1, 6)] + ["c_other.parquet:1", "c_other.parquet:2"])
    assert [r["source"] for r in rows if r["error"]] == ["b_corrupt.parquet:1"]
