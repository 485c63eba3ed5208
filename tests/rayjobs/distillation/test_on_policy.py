"""On-policy distillation (``distillation.on_policy``) against the teacher scoring service.

Real engines throughout: the scoring service (vLLM CPU under Ray Serve) on the tiny teacher, the
student's vLLM sampler actor, and Ray Train + DeepSpeed ZeRO-3 (the sampler refresh gathers the
partitioned weights). The student of ``xtok_world`` has its own tokenizer, so the student's samples
reach the teacher through the cross-tokenizer alignment. One run covers the loop and the resume:
the worker dies after step 3 (test hook), the restarted attempt resumes from the step-2
checkpoint and must refresh the sampler from those weights before it samples again (the sampler
had moved on to them already; the policy lag shows which weights sampled each step).
"""

from __future__ import annotations

import json
import math
import os

import pytest

from rayjobs.serve import local_ray_env

pytestmark = pytest.mark.slow

os.environ.update(local_ray_env())  # as `raystill teacher serve` would for its own Ray

KEY = "on-policy-teacher-key"
SERVICE = {"loss": {"kind": "logit", "alpha": 0.5},
           "teacher": {"source": "service", "service": {"top_k": 4, "retries": 12}}}


@pytest.fixture(scope="module")
def crashed_on_policy_run(serve_teacher, distill_config, xtok_world):
    from rayjobs.config import load_config
    from rayjobs.distill import train

    _, sections = serve_teacher("on-policy-teacher", SERVICE, KEY)
    distillation = {**SERVICE,
                    "on_policy": {"fraction": 1.0, "max_new_tokens": 24, "sync_every": 2, "temperature": 1.0,
                                  "engine_kwargs": {"dtype": "float32"}},
                    "optim": {"lr": 3e-3, "max_steps": 4, "micro_batch_size": 8, "warmup_ratio": 0.25},
                    "deepspeed": {"zero_stage": 3}, "checkpoint_every": 2}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYSTILL_TEST_CRASH_AT_STEP", "3")
        state = train(load_config(distill_config("on-policy", distillation, **sections)), log=print)
    for row in state["history"]:
        print(json.dumps(row))
    return state


def test_on_policy_steps_sample_score_and_refresh(crashed_on_policy_run):
    history = crashed_on_policy_run["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    for row in history:
        assert math.isfinite(row["loss"]) and row["on_policy_batches"] == 1
        assert row["sampled_tokens"] > 0 and row["sampled_tokens_per_s"] > 0 and row["scored_tokens_per_s"] > 0
    # sync_every 2: the sampler holds step 0's weights for steps 1-2, step 2's for 3-4 (the resume
    # refreshed it from the step-2 checkpoint), so the lag is 0, 1, 0, 1.
    assert [r["policy_lag"] for r in history] == [0, 1, 0, 1]
    assert any(r["kd"] > 0 for r in history)  # the student's own tokens, scored by the teacher, aligned
    # Step 2 refreshed the sampler and said what it cost; the last step has no refresh.
    assert history[1]["sampler_sync_s"] > 0 and history[1]["sampler_reload_s"] > 0
    assert not any("sampler_sync_s" in r for r in (history[0], history[2], history[3]))
    assert crashed_on_policy_run["final"]["val_kd"] > 0  # validation stays on the stored samples


def test_on_policy_run_resumes_mid_run(crashed_on_policy_run):
    state = crashed_on_policy_run
    assert state["attempt"] == 1 and state["restored_from"] == [2]
    assert [r["attempt"] for r in state["history"]] == [0, 0, 1, 1]
    # The resumed attempt refreshed the sampler from the step-2 weights before its first step.
    assert state["sampler_step"] == 2 and state["on_policy_batches"] == 4
