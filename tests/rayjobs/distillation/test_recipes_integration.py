"""The #21 recipes under Ray Train + DeepSpeed on CPU, tiny demo world (one short run each).

Student: Llama, 1 block, width 32, its own tokenizer; teacher: Qwen2, 2 blocks, width 64 (see
``test_xtok_integration``). Shards are made without vLLM (``conftest.build_shards``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _train(distill_config, name: str, distillation: dict) -> dict:
    from rayjobs.config import load_config
    from rayjobs.distill import train

    return train(load_config(distill_config(name, distillation)), log=lambda *_: None)


def _merged_keys(path: str) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_adafactor_with_warmup_steps_and_temperature_phases(tiny_world, xtok_world, distill_config, ray_local):
    state = _train(distill_config, "adafactor", {
        "loss": {"kind": "logit", "xtok": {"method": "vocab_map"},
                 "schedule": {"temperatures": [{"until_epoch": 1, "temperature": 2.0}, {"temperature": 1.0}]}},
        "optim": {"optimizer": "adafactor", "lr": 1e-2, "warmup_steps": 2, "schedule": "constant", "epochs": 2,
                  "micro_batch_size": 20},
        "deepspeed": {"zero_stage": 0},
    })
    rows = state["history"]
    # 40 train rows / 20 per micro-batch: 2 steps per epoch, 2 epochs.
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["temperature"] for r in rows] == [2.0, 2.0, 1.0, 1.0]
    assert [r["lr"] for r in rows] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2])
    assert all(r["kd"] > 0 for r in rows)
    assert _merged_keys(state["final"]["merged"]) == _merged_keys(tiny_world.student)


def test_progressive_layers_join_the_feature_loss_by_step(tiny_world, xtok_world, distill_config, ray_local):
    state = _train(distill_config, "progressive", {
        "loss": {"kind": "feature", "feature": {"layer_map": [[0, 0], [1, 2]], "hidden_loss": "mse",
                                                "progressive": {"every": 2}}},
    })
    rows = state["history"]
    assert [r["layer_pairs"] for r in rows] == [1, 1, 2, 2]
    assert all(r["hidden"] > 0 for r in rows)


def test_feature_noise_and_dropout_train_but_never_reach_the_merged_model(tiny_world, xtok_world, distill_config,
                                                                           ray_local):
    state = _train(distill_config, "noise", {
        "loss": {"kind": "feature", "feature": {"noise": {"sigma": 0.3, "sigma_end": 0.0}}},
        "dropout": {"attention": 0.2, "hidden": 0.2},
    })
    assert [r["feature_sigma"] for r in state["history"]] == pytest.approx([0.3, 0.2, 0.1, 0.0])
    merged = json.loads((Path(state["final"]["merged"]) / "config.json").read_text())
    base = json.loads((Path(tiny_world.student) / "config.json").read_text())
    assert merged["attention_dropout"] == base["attention_dropout"] == 0.0


def test_contrastive_term_trains_with_an_online_teacher(tiny_world, xtok_world, distill_config, ray_local):
    state = _train(distill_config, "contrastive", {
        "loss": {"kind": "logit", "contrastive": {"weight": 0.5, "temperature": 0.1}},
        "teacher": {"source": "online"},
    })
    rows = state["history"]
    assert all(r["contrastive"] > 0 and r["kd"] > 0 for r in rows)
    assert state["final"]["contrastive"] > 0
    assert _merged_keys(state["final"]["merged"]) == _merged_keys(tiny_world.student)  # projection dropped
