"""Feature and cross-tokenizer distillation end to end: Ray Train + DeepSpeed on CPU, tiny demo world.

The student has its own tokenizer (``DemoRecipe.tiny()``: Llama, 1 block, 1 head, width 32; the
Qwen2 teacher has 2 blocks, 2 heads, width 64). Shards are made here without vLLM, through the
generation stage's own ``StudentStage``: the teacher's "generation" is the task's reference
completion in teacher tokens, its top-k comes from a real forward pass of the teacher. The runs:

* ``kind: feature`` with the online teacher: two stages (hidden states only, then CE + KD + hidden
  + attention), a temperature ramp; the merged model loads in transformers and holds no projection.
* ``kind: logit`` from the stored top-k across tokenizers (``vocab_map``): KD is on.
* ``kind: logit`` from the online teacher sharded with ZeRO-3 and offloaded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

TOPK = 4


def _completion(messages: list[dict]) -> str:
    from rayjobs.demo.task import Problem, assistant_content

    a, b = map(int, re.search(r"(\d+) \+ (\d+)", messages[-1]["content"]).groups())
    return assistant_content(Problem(a, b))


def build_shards(world, out: Path, n_train: int = 40, n_val: int = 8) -> None:
    """Generation-stage output for ``world.student``, the teacher's top-k from its forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datasets_pipeline import records as R
    from datasets_pipeline.shards import ShardStore
    from datasets_pipeline.stages import StudentStage
    from datasets_pipeline.targets import render_prompt
    from rayjobs.demo.task import read_prompts_jsonl

    tok = AutoTokenizer.from_pretrained(world.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(world.teacher, dtype=torch.float32).eval()
    cfg = {"teacher": str(world.teacher), "input": {"path": "unused"}, "output": str(out),
           "sampling": {"logprobs_topk": TOPK, "max_new_tokens": 96}}
    stage = StudentStage(cfg, str(world.teacher), str(world.student))
    rows = []
    for i, record in enumerate(read_prompts_jsonl(world.train_jsonl)[: n_train + n_val]):
        messages, completion = record["messages"], _completion(record["messages"])
        prompt = tok(render_prompt(tok, messages), add_special_tokens=False)["input_ids"]
        tokens = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = teacher(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        lps, ids = torch.log_softmax(logits, -1).topk(TOPK, -1)
        out_row = stage({
            "prompt_id": f"p{i:04d}", "sample_id": f"p{i:04d}/0", "sample_index": 0,
            "split": "val" if i >= n_train else "train", "messages": json.dumps(messages),
            "reference": record["answer"], "generated_text": completion,
            "generated_tokens": np.asarray(tokens, np.int32), "topk_ids": ids.numpy().astype(np.int32).reshape(-1),
            "topk_logprobs": lps.numpy().astype(np.float16).reshape(-1),
        })
        assert out_row["status"] == "ok" and out_row["teacher_align"], out_row
        rows.append({k: out_row[k] for k in R.SAMPLE_COLUMNS})
    ShardStore(str(out)).write_shard(0, rows, [], [r["prompt_id"] for r in rows], [], {"kept": len(rows)})


@pytest.fixture(scope="module")
def xtok_world(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    build_shards(tiny_world, root / "generated")
    return root


def write_config(world, root: Path, name: str, distillation: dict) -> Path:
    cfg = {
        "name": name,
        "runs_root": str(root / "runs"),
        "generation": {"teacher": str(world.teacher), "input": {"path": str(world.train_jsonl)},
                       "output": str(root / "generated"), "sampling": {"max_new_tokens": 64, "logprobs_topk": TOPK}},
        "distillation": {
            "student": str(world.student),
            "output": str(root / "out" / name),
            "max_seq_len": 512,  # more than the student's 128 positions: the limit is the model's
            "optim": {"lr": 3e-3, "max_steps": 4, "micro_batch_size": 8, "warmup_ratio": 0.25},
            "deepspeed": {"zero_stage": 2},
            "scaling": {"torch_threads": 1},
            "checkpoint_every": 100,
            "eval": {"limit": 4, "max_new_tokens": 48, "batch_size": 4},
            **distillation,
        },
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]


def test_feature_distillation_with_online_teacher_across_tokenizers(tiny_world, xtok_world, ray_local):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from rayjobs.config import load_config
    from rayjobs.distill import run

    path = write_config(tiny_world, xtok_world, "feature", {
        "loss": {"kind": "feature", "alpha": 0.5,
                 "feature": {"hidden_loss": "cosine", "hidden_weight": 1.0, "attention_weight": 0.5},
                 "schedule": {"stage1_steps": 2, "temperature_start": 2.0, "temperature_end": 1.0}},
    })
    summary = run(load_config(path))
    out = xtok_world / "out" / "feature"
    rows = _curve(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["stage"] for r in rows] == [1, 1, 2, 2]
    assert [r["temperature"] for r in rows] == pytest.approx([2.0, 2 - 1 / 3, 2 - 2 / 3, 1.0])
    assert all(math.isfinite(r["loss"]) and r["hidden"] > 0 for r in rows)
    assert rows[0]["kd"] == 0 and rows[0]["attention"] == 0
    assert rows[-1]["kd"] > 0 and rows[-1]["attention"] > 0
    assert summary["steps"] == 4 and "student_em_after" in summary and "teacher_agreement" in summary
    assert summary["context"] == {"limit": 128, "policy": "truncate", "over_limit": 0, "truncated": 0, "dropped": 0}

    merged = Path(summary["merged"])
    assert summary["released"] and json.loads((out / "merged" / "RELEASE.json").read_text())["version"] == str(merged)
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(Path(tiny_world.student) / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())  # the student's tensors only: no projection, no wrapper prefix
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_world.student, dtype=torch.float32)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_logit_distillation_from_stored_topk_across_tokenizers(tiny_world, xtok_world, ray_local):
    from rayjobs.config import load_config
    from rayjobs.distill import train

    path = write_config(tiny_world, xtok_world, "xtok-logit", {
        "loss": {"kind": "logit", "alpha": 0.5, "xtok": {"method": "vocab_map"}},
        "optim": {"lr": 3e-3, "max_steps": 2, "micro_batch_size": 8},
    })
    state = train(load_config(path), log=lambda *_: None)
    assert state["rows"]["xtok"] == state["rows"]["with_teacher_topk"] == 48
    assert all(r["kd"] > 0 and math.isfinite(r["loss"]) for r in state["history"])
    assert state["final"]["val_kd"] > 0


def test_online_logit_distillation_with_a_zero3_sharded_teacher(tiny_world, xtok_world, ray_local):
    """The teacher under DeepSpeed ZeRO-3 (parameters offloaded to CPU) beside the student's ZeRO-2 engine."""
    from rayjobs.config import load_config
    from rayjobs.distill import train

    path = write_config(tiny_world, xtok_world, "online-zero3", {
        "loss": {"kind": "logit", "alpha": 0.5, "xtok": {"online_topk": 8}},
        "teacher": {"source": "online", "shard": "zero3", "offload": True},
        "optim": {"lr": 3e-3, "max_steps": 2, "micro_batch_size": 8},
    })
    state = train(load_config(path), log=lambda *_: None)
    assert [r["step"] for r in state["history"]] == [1, 2]
    assert all(r["kd"] > 0 and math.isfinite(r["loss"]) for r in state["history"])


def test_context_policy_drop_filters_in_the_dataset(xtok_world, ray_local):
    from datasets_pipeline.shards import ShardStore
    from rayjobs.distill import data_stats
    from rayjobs.distillation.engine import build_datasets

    data = str(xtok_world / "generated")
    stats = data_stats(data, context_limit=50)
    assert stats["over_context"] == 48 and stats["over_context_train"] == 40
    store = ShardStore(data)
    kept = build_datasets(store.sample_files(), store.fs, ["input_ids"], stats, drop_over=1000)
    dropped = build_datasets(store.sample_files(), store.fs, ["input_ids"], stats, drop_over=50)
    assert kept["train"].count() == 40 and dropped["train"].count() == 0


def test_a_student_below_the_gate_never_becomes_what_is_served(tiny_world, xtok_world, ray_local):
    """#17 item 9: before, the merged student was written over the served location before its eval.

    A first run passes its gate and is released to ``out/merged``; a second run into the same output
    with an unreachable gate leaves ``merged/`` and the version it points at byte-identical.
    """
    from rayjobs.config import load_config
    from rayjobs.distill import run

    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    base = {"loss": {"kind": "data"}, "optim": {"lr": 3e-3, "max_steps": 2, "micro_batch_size": 8}}
    first = run(load_config(write_config(tiny_world, xtok_world, "gate-pass", {**base, "output": str(xtok_world / "gate")})))
    served = xtok_world / "gate" / "merged"
    assert first["released"] and json.loads((served / "RELEASE.json").read_text())["version"] == first["merged"]
    before = {"served": snapshot(served), "version": snapshot(Path(first["merged"]))}

    failing = {**base, "output": str(xtok_world / "gate"), "gate": {"min_em": 1.0, "min_teacher_agreement": 1.0}}
    second = run(load_config(write_config(tiny_world, xtok_world, "gate-fail", failing)))
    assert not second["gate"]["passed"] and not second["released"] and second["merged"] != first["merged"]
    assert {"served": snapshot(served), "version": snapshot(Path(first["merged"]))} == before
