"""Bring your own traces (#16) on the real pipeline and the tiny demo world.

Supplied, unscored (JSONL): shards and manifest with no engine started, proved by a teacher
directory that holds no weights at all; distillation then refuses logit KD on those shards.
Supplied and scored (Parquet): one vLLM engine start through the same ray.data.llm processor, and
the stored top-k, as the distillation's collator reads them, equal the teacher's own distribution
(transformers, fp32) at every response position. Both inputs carry the same bad rows (no response,
a blank one, no prompt): rejects with their reasons, in either format.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from datasets_pipeline import records as R
from datasets_pipeline.shards import ShardStore

pytestmark = pytest.mark.slow
N_GOOD = 10
WRONG = {1, 4}  # rows whose supplied answer is wrong: set aside as unverified (train split)
TOLERANCE = 0.05  # scored logprobs vs transformers' fp32 forward (stored as float16)


def _traces(world, n: int) -> list[dict]:
    """The demo prompts with R1-style responses (the task's own trace), a few answers wrong."""
    from rayjobs.demo.task import Problem, assistant_content

    rows = []
    for i, line in enumerate(Path(world.train_jsonl).read_text().splitlines()[:n]):
        row = json.loads(line)
        a, b = map(int, re.findall(r"\d+", row["messages"][-1]["content"])[:2])
        response = assistant_content(Problem(a, b))
        if i in WRONG:
            response = response.rsplit("\n", 1)[0] + f"\n{a + b + 1}"
        rows.append({**row, "response": response})
    return rows


BAD = [{"id": "no-response", "messages": [{"role": "user", "content": "What is 1 + 2?"}], "answer": "3"},
       {"id": "blank-response", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4",
        "response": "  "},
       {"id": "no-prompt", "answer": "5", "response": "<think>\n</think>\n5"}]


def _write(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(world, teacher: str, input_path: Path, out: Path, **gen) -> Path:
    cfg = {
        "name": "own-traces",
        "generation": {"teacher": teacher, "output": str(out), **gen,
                       "input": {"path": str(input_path), "response_field": "response", "max_prompt_chars": 2000},
                       "engine": {"batch_size": 8, "max_model_len": 256},
                       "preprocess": {"keep": "verified", "val_fraction": 0.0}},
        "distillation": {"student": str(world.student_same_tokenizer), "output": str(out.parent / "distill"),
                         "max_seq_len": 200},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg_path: Path, *sets: str):
    from rayjobs import generate
    from rayjobs.config import load_config

    logs = []
    manifest = generate.run(load_config(cfg_path, list(sets)), log=logs.append)
    return manifest, logs


@pytest.fixture(scope="module")
def weightless_teacher(tiny_world, tmp_path_factory):
    """The teacher's config and tokenizer without its weights: any engine start would fail on it."""
    out = tmp_path_factory.mktemp("weightless") / "teacher"
    shutil.copytree(tiny_world.teacher, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return str(out)


@pytest.fixture(scope="module")
def supplied_run(tiny_world, weightless_teacher, ray_local, tmp_path_factory):
    """An unscored run over JSONL traces: (output, manifest, logs, traces)."""
    tmp = tmp_path_factory.mktemp("supplied")
    traces = _traces(tiny_world, N_GOOD)
    cfg = _config(tiny_world, weightless_teacher, _write(traces + BAD, tmp / "traces.jsonl"), tmp / "gen")
    return (tmp / "gen", *_run(cfg), traces)


def _check_rejects(manifest: dict, store: ShardStore, n: int) -> None:
    """The three bad rows after ``n`` good ones, set aside with their reasons."""
    rejects = {r["source"].split(":")[-1]: (r["stage"], r["reason"]) for r in store.read_rejects().to_pylist()
               if r["stage"] in ("input", "response")}
    assert rejects == {str(n + 1): ("response", R.MISSING_RESPONSE), str(n + 2): ("response", R.EMPTY_RESPONSE),
                       str(n + 3): ("input", "missing field 'messages'")}
    counts = manifest["counts"]
    assert (counts[R.MISSING_RESPONSE], counts[R.EMPTY_RESPONSE], counts["input_rejected"]) == (1, 1, 1)


def test_own_traces_supplied_without_scoring_make_shards_and_no_engine_starts(supplied_run, weightless_teacher):
    from transformers import AutoTokenizer

    out, manifest, logs, traces = supplied_run
    assert any("no engine runs" in line for line in logs) and not any("KV cache" in line for line in logs)
    assert manifest["samples_source"] == "supplied" and manifest["topk_k"] == 0
    assert manifest["counts"] == {"kept": N_GOOD - len(WRONG), R.UNVERIFIED: len(WRONG), R.MISSING_RESPONSE: 1,
                                  R.EMPTY_RESPONSE: 1, "input_rejected": 1}, manifest["counts"]
    store = ShardStore(str(out))
    _check_rejects(manifest, store, len(traces))
    tok = AutoTokenizer.from_pretrained(weightless_teacher)
    by_id = {t["id"]: t for t in traces}
    table = store.read_samples()
    assert table.schema.equals(R.SAMPLE_SCHEMA, check_metadata=False) and table.num_rows == N_GOOD - len(WRONG)
    for row in table.to_pylist():
        response = by_id[row["prompt_id"]]["response"]
        tokens = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row["completion"] == response and row["verified"] and row["teacher_token_ids"] == tokens
        assert row["topk_k"] == 0 and row["input_ids"][row["teacher_offset"]:] == tokens
    assert manifest["stats"]["train"]["with_teacher_topk"] == 0


def test_own_traces_logit_kd_on_unscored_shards_is_refused_by_the_distill_job(supplied_run, capsys):
    """The config is fine on its own (a plain generation block); the shards' manifest says no."""
    from rayjobs.distill import main

    out = supplied_run[0]
    cfg = out.parent / "gen.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["generation"]["input"] = {"path": data["generation"]["input"]["path"]}
    data["distillation"].update(data=str(out), loss={"kind": "logit"})
    cfg.write_text(yaml.safe_dump(data))
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error: distillation.loss.kind 'logit' needs the teacher's top-k logprobs" in err
    assert "generation.score_supplied: true" in err and f"the shards at {out}" in err


def test_own_traces_scored_top_k_is_the_teachers_distribution_where_distillation_reads_it(
        tiny_world, ray_local, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayjobs.distillation.collate import CollateSettings, collate

    traces = _traces(tiny_world, 8)
    # Prompt + response over engine.max_model_len: the engine refuses it, and it is set aside unretried.
    too_long = {"id": "too-long", "messages": traces[0]["messages"], "answer": "0", "response": "1+1+0=02\n" * 60}
    path = _write(traces + BAD + [too_long], tmp_path / "traces.parquet")
    k = 4
    manifest, logs = _run(_config(tiny_world, str(tiny_world.teacher), path, tmp_path / "gen",
                                  score_supplied=True, sampling={"logprobs_topk": k}))
    assert manifest["samples_source"] == "supplied" and manifest["topk_k"] == k
    assert manifest["counts"][R.ENGINE_ERROR] == 1 and not any("retrying" in line for line in logs)
    store = ShardStore(str(tmp_path / "gen"))
    _check_rejects(manifest, store, len(traces))
    table = store.read_samples()
    rows = table.to_pylist()
    assert len(rows) == manifest["counts"]["kept"] == len(traces) - len(WRONG)
    assert manifest["stats"]["train"]["with_teacher_topk"] == len(rows)
    assert 6 * k <= manifest["topk_bytes_per_token"] <= 8 * k + 16

    tok = AutoTokenizer.from_pretrained(tiny_world.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world.teacher, dtype=torch.float32).eval()
    batch = {c: [r[c] for r in rows] for c in table.column_names}
    out = collate(batch, CollateSettings(pad_id=tok.pad_token_id, max_seq_len=200))
    worst = 0.0
    for r, row in enumerate(rows):
        prompt = tok(tok.apply_chat_template(json.loads(row["messages"]), tokenize=False,
                                             add_generation_prompt=True))["input_ids"]
        tokens = row["teacher_token_ids"]
        with torch.no_grad():
            logits = teacher(torch.tensor([prompt + tokens])).logits[0].float()
        ref = torch.log_softmax(logits, -1)[len(prompt) - 1:len(prompt) + len(tokens) - 1]  # predicts each token
        positions = out["teacher_mask"][r].nonzero().flatten()
        assert positions.tolist() == list(range(row["teacher_offset"] - 1, row["teacher_offset"] + len(tokens) - 1))
        ids, lps = out["teacher_ids"][r, positions], out["teacher_logprobs"][r, positions]
        assert (out["labels"][r, positions] == torch.tensor(tokens)).all()
        at_ids = ref.gather(1, ids)
        worst = max(worst, (lps - at_ids).abs().max().item())
        # The teacher's k most likely tokens, up to near-ties in the engine's arithmetic.
        assert (at_ids >= ref.topk(k).values[:, -1:] - TOLERANCE).all()
    print(f"scored top-{k}: largest |stored - transformers| logprob {worst:.4f}")
    assert worst < TOLERANCE, worst
