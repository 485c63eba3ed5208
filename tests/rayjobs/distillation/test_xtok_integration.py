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
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]


def test_feature_distillation_with_online_teacher_across_tokenizers(tiny_world, xtok_world, distill_config, ray_local):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from rayjobs.config import load_config
    from rayjobs.distill import run

    path = distill_config("feature", {
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


def test_logit_distillation_from_stored_topk_across_tokenizers(tiny_world, xtok_world, distill_config, ray_local):
    from rayjobs.config import load_config
    from rayjobs.distill import train

    path = distill_config("xtok-logit", {
        "loss": {"kind": "logit", "alpha": 0.5, "xtok": {"method": "vocab_map"}},
        "optim": {"lr": 3e-3, "max_steps": 2, "micro_batch_size": 8},
    })
    state = train(load_config(path), log=lambda *_: None)
    assert state["rows"]["xtok"] == state["rows"]["with_teacher_topk"] == 48
    assert all(r["kd"] > 0 and math.isfinite(r["loss"]) for r in state["history"])
    assert state["final"]["val_kd"] > 0


def test_online_logit_distillation_with_a_zero3_sharded_teacher(tiny_world, xtok_world, distill_config, ray_local):
    """The teacher under DeepSpeed ZeRO-3 (parameters offloaded to CPU) beside the student's ZeRO-2 engine."""
    from rayjobs.config import load_config
    from rayjobs.distill import train

    path = distill_config("online-zero3", {
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


def test_a_student_below_the_gate_never_becomes_what_is_served(tiny_world, xtok_world, distill_config, ray_local):
    """#17 item 9: before, the merged student was written over the served location before its eval.

    A first run passes its gate and is released to ``out/merged``; a second run into the same output
    with an unreachable gate leaves ``merged/`` and the version it points at byte-identical.
    """
    from rayjobs.config import load_config
    from rayjobs.distill import run

    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    base = {"loss": {"kind": "data"}, "optim": {"lr": 3e-3, "max_steps": 2, "micro_batch_size": 8}}
    first = run(load_config(distill_config("gate-pass", {**base, "output": str(xtok_world / "gate")})))
    served = xtok_world / "gate" / "merged"
    assert first["released"] and json.loads((served / "RELEASE.json").read_text())["version"] == first["merged"]
    before = {"served": snapshot(served), "version": snapshot(Path(first["merged"]))}

    failing = {**base, "output": str(xtok_world / "gate"), "gate": {"min_em": 1.0, "min_teacher_agreement": 1.0}}
    second = run(load_config(distill_config("gate-fail", failing)))
    assert not second["gate"]["passed"] and not second["released"] and second["merged"] != first["merged"]
    assert {"served": snapshot(served), "version": snapshot(Path(first["merged"]))} == before
