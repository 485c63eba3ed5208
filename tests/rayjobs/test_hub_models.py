"""Models named by hub id (#16): generation, distillation with the online teacher, evaluation and
serving all take ``org/name`` as they take a local path or s3://.

Offline: ``HF_HUB_OFFLINE=1`` and a hub cache laid out as the hub lays it out
(``models--org--name/snapshots/<rev>/...`` plus ``refs/main``) holding the tiny worlds' models under
hub-style names. ``HF_TOKEN`` is set and must never appear in the output. Before, distillation
turned every model name into a local path (``os.path.abspath``) and failed on a hub id.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cluster.ports import free_port

pytestmark = pytest.mark.slow
TOKEN = "hf_raystill_test_token_never_logged"


def _hub_cache(root: Path, models: dict[str, Path]) -> dict:
    """The models under hub ids in a hub-layout cache; returns the offline environment that reads it."""
    for repo_id, src in models.items():
        repo = root / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / "0000000000000000000000000000000000000001"
        shutil.copytree(src, snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(snapshot.name)
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "HF_TOKEN": TOKEN}


def _config(name: str, teacher: str, student: str, train_jsonl, tmp_path: Path, limit: int, topk: int,
            distillation: dict) -> dict:
    return {
        "name": name,
        "runs_root": str(tmp_path / "runs"),
        "generation": {"teacher": teacher, "input": {"path": str(train_jsonl), "limit": limit},
                       "output": str(tmp_path / "generated"),
                       "sampling": {"max_new_tokens": 32, "logprobs_topk": topk},
                       "engine": {"batch_size": 16, "max_model_len": 256},
                       "preprocess": {"keep": "all", "val_fraction": 0.25, "drop_truncated": False}},
        "distillation": {"student": student, "output": str(tmp_path / "distill"), "max_seq_len": 128,
                         "optim": {"max_steps": 2, "micro_batch_size": 4}, "checkpoint_every": 2,
                         "eval": {"limit": 4, "max_new_tokens": 16}, **distillation},
    }


def test_hub_ids_work_in_every_stage_offline(tiny_world, tmp_path, run_cli_pipeline):
    env = _hub_cache(tmp_path / "hub", {"raystill-test/tiny-teacher": Path(tiny_world.teacher),
                                        "raystill-test/tiny-student": Path(tiny_world.student_same_tokenizer)})
    cfg = _config("hub", "raystill-test/tiny-teacher", "raystill-test/tiny-student", tiny_world.train_jsonl,
                  tmp_path, 32, 4, {"loss": {"kind": "logit"}, "teacher": {"source": "online"}})
    cfg["serving"] = {"model": "raystill-test/tiny-student", "port": free_port(), "max_model_len": 128,
                      "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    text = run_cli_pipeline(cfg, tmp_path, "--exit", env=env, timeout=1100)
    assert "preflight: generation.teacher: Qwen2ForCausalLM" in text
    assert "query:" in text and "student EM after" in text
    assert TOKEN not in text


def test_hub_ids_reach_the_r1_world_offline(r1_tiny_world, tmp_path, run_cli_pipeline):
    """The R1 -> Qwen2.5 pair by hub id: generation (DeepSeek's tokenizer in vLLM) and distillation
    across the real vocabularies (stored top-20 through the vocabulary map); serving is covered above."""
    env = _hub_cache(tmp_path / "hub", {"raystill-test/DeepSeek-R1-tiny": Path(r1_tiny_world.teacher),
                                        "raystill-test/Qwen2.5-tiny": Path(r1_tiny_world.student)})
    cfg = _config("hub-r1", "raystill-test/DeepSeek-R1-tiny", "raystill-test/Qwen2.5-tiny", r1_tiny_world.train_jsonl,
                  tmp_path, 8, 20, {"loss": {"kind": "logit", "xtok": {"method": "vocab_map"}}})
    text = run_cli_pipeline(cfg, tmp_path, "--no-serve", env=env)
    assert "preflight: generation.teacher: LlamaForCausalLM, vocab 129280" in text
    assert "preflight: distillation.student: Qwen2ForCausalLM, vocab 151936" in text
    assert "student EM after" in text and TOKEN not in text
