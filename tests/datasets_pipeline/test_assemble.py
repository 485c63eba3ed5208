import json

from datasets_pipeline import records as R
from datasets_pipeline.assemble import Assembler

MSG = json.dumps([{"role": "user", "content": "q"}])


def row(pid, i, status="ok", verified=True, completion=None, ntok=3, split="train"):
    r = {c: None for c in R.SAMPLE_COLUMNS}
    r.update(prompt_id=pid, sample_id=f"{pid}/{i}", sample_index=i, status=status, verified=verified,
             messages=MSG, completion=completion or f"c{i}", teacher_token_ids=[1] * ntok, split=split)
    return r


def test_prompt_completes_after_n_samples_in_any_order():
    a = Assembler(n=2, keep="all", dedupe=True)
    assert a.add(row("p", 1)).prompt_ids == []
    done = a.add(row("p", 0))
    assert done.prompt_ids == ["p"] and [s["sample_index"] for s in done.samples] == [0, 1]
    assert set(done.samples[0]) == set(R.SAMPLE_COLUMNS)


def test_filtered_samples_count_toward_completion_and_become_rejects():
    a = Assembler(n=2, keep="all", dedupe=True)
    a.add(row("p", 0, status=R.TRUNCATED))
    done = a.add(row("p", 1))
    assert len(done.samples) == 1 and done.rejects[0]["reason"] == R.TRUNCATED


def test_verified_policy_drops_wrong_answers_keeps_unknown():
    a = Assembler(n=3, keep="verified", dedupe=True)
    a.add(row("p", 0, verified=False))
    a.add(row("p", 1, verified=None))
    done = a.add(row("p", 2, verified=True))
    assert sorted(s["sample_index"] for s in done.samples) == [1, 2]
    assert [r["reason"] for r in done.rejects] == [R.UNVERIFIED]


def test_val_prompts_keep_every_sample_under_any_policy():
    for keep in ("verified", "best_of_n"):
        a = Assembler(n=2, keep=keep, dedupe=True)
        a.add(row("v", 0, verified=False, split="val"))
        done = a.add(row("v", 1, verified=True, split="val", ntok=9))
        assert [s["sample_index"] for s in done.samples] == [0, 1] and done.rejects == []


def test_other_filters_still_apply_to_val():
    a = Assembler(n=2, keep="verified", dedupe=True)
    a.add(row("v", 0, status=R.TRUNCATED, split="val"))
    done = a.add(row("v", 1, verified=False, split="val"))
    assert [s["sample_index"] for s in done.samples] == [1] and [r["reason"] for r in done.rejects] == [R.TRUNCATED]


def test_best_of_n_picks_shortest_verified():
    a = Assembler(n=3, keep="best_of_n", dedupe=True)
    a.add(row("p", 0, verified=True, ntok=9))
    a.add(row("p", 1, verified=False, ntok=1))
    done = a.add(row("p", 2, verified=True, ntok=4))
    assert [s["sample_index"] for s in done.samples] == [2]
    assert sorted(r["reason"] for r in done.rejects) == [R.NOT_BEST, R.NOT_BEST]


def test_duplicates_across_prompts_and_repeated_ids():
    a = Assembler(n=1, keep="all", dedupe=True)
    assert len(a.add(row("p", 0, completion="same")).samples) == 1
    dup = a.add(row("q", 0, completion="same"))  # same prompt text, same completion
    assert dup.samples == [] and dup.rejects[0]["reason"] == R.DUPLICATE
    again = a.add(row("p", 0))  # the same prompt id arriving again
    assert again.rejects[0]["reason"] == R.DUPLICATE


def test_resume_state_is_respected():
    a = Assembler(n=1, keep="all", dedupe=True, done={"p"})
    assert a.add(row("p", 0)).samples == []


def test_prompts_missing_samples_at_the_end_are_set_aside_whole():
    """#17 item 11: a prompt whose n samples never all arrive used to stay pending, unwritten."""
    a = Assembler(n=3, keep="all", dedupe=True)
    a.add(row("p", 2))
    a.add(row("q", 0))
    assert a.add(row("q", 1)).prompt_ids == []
    end = a.close()
    assert end.prompt_ids == ["p", "q"] and end.samples == []
    assert [r["source"] for r in end.rejects] == ["p/0", "p/1", "p/2", "q/0", "q/1", "q/2"]
    assert {r["reason"] for r in end.rejects} == {R.INCOMPLETE_SAMPLES}
    assert "1 of 3 samples arrived (indices [2])" in end.rejects[0]["detail"]
    assert a.close().prompt_ids == [] and a.add(row("p", 0)).rejects[0]["reason"] == R.DUPLICATE


def test_the_end_of_generation_commits_every_prompt(tmp_path):
    """What run_generation does when the stream ends: incomplete prompts are committed as rejects."""
    from datasets_pipeline.generate import ShardWriter
    from datasets_pipeline.shards import ShardStore

    store = ShardStore(str(tmp_path), "abc")
    writer = ShardWriter(store, store.load_progress(), shard_rows=100)
    a = Assembler(n=2, keep="all", dedupe=True)
    for r in (row("done", 0, status=R.TRUNCATED), row("done", 1, status=R.TRUNCATED), row("short", 1)):
        writer.add(a.add(r))
    writer.add(a.close())
    writer.flush()
    assert store.load_progress().done == {"done", "short"}
    assert writer.totals == {"kept": 0, R.TRUNCATED: 2, R.INCOMPLETE_SAMPLES: 2}
    assert sorted(store.read_rejects().column("source").to_pylist()) == ["done/0", "done/1", "short/0", "short/1"]
