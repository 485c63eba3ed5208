"""examples/configs/r1-qwen.yaml end to end (#16) on the r1-qwen world's tiny recipe.

The real R1 tokenizer and 129,280-row teacher, the real Qwen2.5 tokenizer and 151,936-row student:
generation with top-20 logprobs, cross-tokenizer logit distillation through the vocabulary map,
merge, evaluation, serving and one query, in its own process as a user runs it. The tiny teacher
is barely trained, so the run is bounded (16 prompts, 2 steps, short replies) and the gate is off:
this is about the pipeline at real vocabulary sizes, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cluster.ports import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _bounded_config(world, tmp: Path) -> dict:
    """The example config with the tiny world's paths for its demo:r1-* references, bounded for CI."""
    cfg = yaml.safe_load((ROOT / "examples" / "configs" / "r1-qwen.yaml").read_text())
    gen, dist = cfg["generation"], cfg["distillation"]
    cfg["runs_root"] = str(tmp / "runs")
    gen.update(teacher=str(world.teacher), output=str(tmp / "generated"),
               preprocess={"keep": "all", "val_fraction": 0.25, "drop_truncated": False})
    gen["input"].update(path=str(world.train_jsonl), limit=16)
    gen["sampling"]["max_new_tokens"] = 24
    gen["engine"]["batch_size"] = 16
    dist.update(student=str(world.student), output=str(tmp / "distill"), max_seq_len=128, checkpoint_every=2,
                eval={"limit": 4, "max_new_tokens": 12})
    dist["optim"].update(max_steps=2, micro_batch_size=4)
    cfg["serving"]["port"] = free_port()
    cfg["serving"]["max_model_len"] = 128
    return cfg


def test_r1_qwen_example_runs_the_whole_loop(r1_tiny_world, tmp_path, run_cli_pipeline):
    cfg = _bounded_config(r1_tiny_world, tmp_path)
    assert cfg["distillation"]["loss"]["kind"] == "logit" and cfg["generation"]["sampling"]["logprobs_topk"] == 20
    text = run_cli_pipeline(cfg, tmp_path, "--exit")
    assert "query:" in text and "student EM after" in text
    manifest = json.loads((tmp_path / "generated" / "manifest.json").read_text())
    # Stored top-k at the real vocabulary stays a sliver of dense (129,280 fp32 logits = 517 kB/token).
    assert manifest["topk_bytes_per_token"] <= 8 * 20 + 16
    summary = json.loads((tmp_path / "runs" / "r1-qwen" / "summary.json").read_text())
    assert summary["student_em_after"] is not None and summary["generation_tokens_per_s"]
