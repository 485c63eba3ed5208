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
