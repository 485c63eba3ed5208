"""ShardStore bookkeeping: resume only what was written under the same config digest."""

import pytest

from datasets_pipeline.shards import ForeignOutput, ShardStore


def test_progress_round_trips_under_the_same_digest(tmp_path):
    ShardStore(str(tmp_path), "abc").write_shard(0, [], [], ["p1", "p2"], ["k"], {"kept": 0})
    prog = ShardStore(str(tmp_path), "abc").load_progress()
    assert prog.done == {"p1", "p2"} and prog.next_shard == 1


def test_resuming_under_another_digest_is_refused(tmp_path):
    ShardStore(str(tmp_path), "abc").write_shard(0, [], [], ["p1"], [], {"kept": 0})
    with pytest.raises(ForeignOutput, match="digest abc, this run xyz"):
        ShardStore(str(tmp_path), "xyz").load_progress()


def test_readers_without_a_digest_do_not_check(tmp_path):
    ShardStore(str(tmp_path), "abc").write_shard(0, [], [], ["p1"], [], {"kept": 0})
    assert ShardStore(str(tmp_path)).load_progress().done == {"p1"}


def _sample(sample_id: str, split: str = "train") -> dict:
    from datasets_pipeline import records as R

    row = {name: [] for name in R.SAMPLE_COLUMNS}
    row.update(sample_id=sample_id, prompt_id=sample_id.split("/")[0], sample_index=0, split=split,
               messages="[]", reference=None, completion="c", reasoning=None, answer="a", verified=None,
               topk_k=0, prompt_len=0, teacher_offset=-1)
    return row


def _reject(source: str) -> dict:
    return {"source": source, "stage": "filter", "reason": "truncated", "detail": None}


def test_a_resumed_shard_does_not_adopt_a_dead_runs_files(tmp_path):
    """#17 item 10: the dead run wrote shard 1's samples and rejects, then died before its marker.
    The resumed run's shard 1 has no samples and no rejects: the stale files must not count."""
    store = ShardStore(str(tmp_path), "abc")
    store.write_shard(0, [_sample("p0/0")], [], ["p0"], [], {"kept": 1})
    store.write_shard(1, [_sample("p1/0")], [_reject("p1/1")], ["p1"], [], {"kept": 1})
    (tmp_path / "progress" / "part-00001.json").unlink()  # died before the commit marker

    resumed = ShardStore(str(tmp_path), "abc")
    prog = resumed.load_progress()
    assert prog.done == {"p0"} and prog.next_shard == 1
    resumed.write_shard(1, [], [], ["p1"], [], {"input_rejected": 0})
    assert resumed.read_samples().column("sample_id").to_pylist() == ["p0/0"]
    assert resumed.read_rejects().num_rows == 0


def test_a_torn_progress_file_is_an_uncommitted_shard(tmp_path):
    """A marker cut off mid-write (by the in-place writes before #17) is not a raw JSON error:
    its shard is uncommitted, ignored by readers and written again by the resumed run."""
    store = ShardStore(str(tmp_path), "abc")
    store.write_shard(0, [_sample("p0/0")], [], ["p0"], [], {"kept": 1})
    store.write_shard(1, [_sample("p1/0")], [], ["p1"], [], {"kept": 1})
    marker = tmp_path / "progress" / "part-00001.json"
    marker.write_bytes(marker.read_bytes()[:25])

    prog = store.load_progress()
    assert prog.done == {"p0"} and prog.next_shard == 1
    assert store.read_samples().column("sample_id").to_pylist() == ["p0/0"]
    store.write_shard(1, [_sample("p1/0")], [], ["p1"], [], {"kept": 1})
    assert store.load_progress().done == {"p0", "p1"}
    assert store.read_samples().column("sample_id").to_pylist() == ["p0/0", "p1/0"]


def test_markers_and_the_manifest_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that dies before it completes leaves the previous content (or nothing), no part."""
    import os

    store = ShardStore(str(tmp_path), "abc")
    store.write_manifest({"complete": False})

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write_manifest({"complete": True, "counts": {"kept": 1}})
    with pytest.raises(KeyboardInterrupt):
        store.write_shard(0, [], [], ["p0"], [], {"kept": 0})
    monkeypatch.undo()
    assert store.read_manifest() == {"complete": False}
    assert store.load_progress().done == set()
