"""Models named by hub id (#16): generation, distillation with the online teacher, evaluation and
serving all take ``org/name`` as they take a local path or s3://.

Offline: ``HF_HUB_OFFLINE=1`` and a hub cache laid out as the hub lays it out
(``models--org--name/snapshots/<rev>/...`` plus ``refs/main``) holding the tiny world's models under
hub-style names. ``HF_TOKEN`` is set and must never appear in the output. Before, distillation
turned every model name into a local path (``os.path.abspath``) and failed on a hub id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.ports import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_raystill_test_token_never_logged"


def _hub_cache(root: Path, models: dict[str, Path]) -> Path:
    for repo_id, src in models.items():
        repo = root / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / "0000000000000000000000000000000000000001"
        shutil.copytree(src, snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(snapshot.name)
    return root


def test_hub_ids_work_in_every_stage_offline(tiny_world, tmp_path):
    hub = _hub_cache(tmp_path / "hub", {"raystill-test/tiny-teacher": Path(tiny_world.teacher),
                                        "raystill-test/tiny-student": Path(tiny_world.student_same_tokenizer)})
    cfg = {
        "name": "hub",
        "runs_root": str(tmp_path / "runs"),
        "generation": {"teacher": "raystill-test/tiny-teacher",
                       "input": {"path": str(tiny_world.train_jsonl), "limit": 32},
                       "output": str(tmp_path / "generated"),
                       "sampling": {"max_new_tokens": 32, "logprobs_topk": 4},
                       "engine": {"batch_size": 16, "max_model_len": 256},
                       "preprocess": {"keep": "all", "val_fraction": 0.25, "drop_truncated": False}},
        "distillation": {"student": "raystill-test/tiny-student", "output": str(tmp_path / "distill"),
                         "max_seq_len": 128, "loss": {"kind": "logit"}, "teacher": {"source": "online"},
                         "optim": {"max_steps": 2, "micro_batch_size": 8}, "checkpoint_every": 2,
                         "eval": {"limit": 4, "max_new_tokens": 16}},
        "serving": {"model": "raystill-test/tiny-student", "port": free_port(), "max_model_len": 128,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    }
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")} | {
        "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_TOKEN": TOKEN}
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.run([sys.executable, "-m", "rayjobs.cli", "run", str(path), "--exit"], cwd=ROOT, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=1100)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "preflight: generation.teacher: Qwen2ForCausalLM" in text
    assert "query:" in text and "student EM after" in text
    assert TOKEN not in text


def test_hub_ids_reach_the_r1_world_offline(r1_tiny_world, tmp_path):
    """The R1 -> Qwen2.5 pair by hub id: generation (DeepSeek's tokenizer in vLLM) and distillation
    across the real vocabularies (stored top-k through the vocabulary map); serving is covered above."""
    hub = _hub_cache(tmp_path / "hub", {"raystill-test/DeepSeek-R1-tiny": Path(r1_tiny_world.teacher),
                                        "raystill-test/Qwen2.5-tiny": Path(r1_tiny_world.student)})
    cfg = {
        "name": "hub-r1",
        "runs_root": str(tmp_path / "runs"),
        "generation": {"teacher": "raystill-test/DeepSeek-R1-tiny",
                       "input": {"path": str(r1_tiny_world.train_jsonl), "limit": 8},
                       "output": str(tmp_path / "generated"),
                       "sampling": {"max_new_tokens": 16, "logprobs_topk": 20},
                       "engine": {"batch_size": 8, "max_model_len": 256},
                       "preprocess": {"keep": "all", "val_fraction": 0.25, "drop_truncated": False}},
        "distillation": {"student": "raystill-test/Qwen2.5-tiny", "output": str(tmp_path / "distill"),
                         "max_seq_len": 128, "loss": {"kind": "logit", "xtok": {"method": "vocab_map"}},
                         "optim": {"max_steps": 1, "micro_batch_size": 4}, "checkpoint_every": 1,
                         "eval": {"limit": 2, "max_new_tokens": 8}},
    }
    path = tmp_path / "hub-r1.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")} | {
        "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_TOKEN": TOKEN}
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.run([sys.executable, "-m", "rayjobs.cli", "run", str(path), "--no-serve"], cwd=ROOT,
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1500)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "preflight: generation.teacher: Qwen2ForCausalLM, vocab 129280" in text
    assert "preflight: distillation.student: Qwen2ForCausalLM, vocab 151936" in text
    assert "student EM after" in text and TOKEN not in text
