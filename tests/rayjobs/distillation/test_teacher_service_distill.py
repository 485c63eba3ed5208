"""``distillation.teacher.source: service``: stored samples scored on the fly by the teacher service.

Real engines throughout: the teacher scoring service (vLLM CPU under Ray Serve) on the tiny demo
teacher, the shards of ``xtok_world`` (student with its own tokenizer, so the top-k go through the
cross-tokenizer alignment), and a short Ray Train + DeepSpeed run. Its top-k must be the ones the
stored path holds (a forward pass of the same teacher), and a replica killed before the run starts
costs the run retries, not its life.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from rayjobs.serve import local_ray_env

pytestmark = pytest.mark.slow

os.environ.update(local_ray_env())  # as `raystill teacher serve` would for its own Ray

KEY = "distill-teacher-key"
TOPK = 4  # the shards' stored top-k


@pytest.fixture(scope="module")
def service(serve_teacher):
    distillation = {"loss": {"kind": "logit", "alpha": 0.5},
                    "teacher": {"source": "service", "service": {"top_k": TOPK, "retries": 12}},
                    "optim": {"lr": 3e-3, "max_steps": 3, "micro_batch_size": 8}}
    return serve_teacher("service-logit", distillation, KEY)[0]


def test_service_topk_are_the_stored_topk(service, tiny_world, xtok_world):
    """Same teacher, same ids: vLLM's prompt log-probs equal the shards' (HF forward) top-k."""
    from transformers import AutoTokenizer

    from datasets_pipeline.shards import ShardStore
    from rayjobs.distillation.service_teacher import ServiceTopK, SERVICE_COLUMNS, client_for

    table = ShardStore(str(xtok_world / "generated")).read_samples(
        ["input_ids", "prompt_len", "teacher_offset", "topk_ids", "topk_logprobs", *SERVICE_COLUMNS])
    batch = {c: table.column(c).to_pylist() for c in table.column_names}
    topk = ServiceTopK(client_for(service.distillation.teacher.service), AutoTokenizer.from_pretrained(
        tiny_world.teacher), TOPK)
    started = time.perf_counter()
    out = topk(batch)
    elapsed = time.perf_counter() - started
    print(f"scored {topk.scored_tokens} tokens of {len(batch['input_ids'])} samples in {elapsed:.2f} s "
          f"({topk.scored_tokens / elapsed:.0f} tokens/s through the collate path)")
    same = close = total = 0
    for r in range(len(batch["input_ids"])):
        want_ids = np.asarray(batch["topk_ids"][r]).reshape(-1, TOPK)
        want_lps = np.asarray(batch["topk_logprobs"][r], np.float32).reshape(-1, TOPK)
        got_ids, got_lps = out["topk_ids"][r].reshape(-1, TOPK), out["topk_logprobs"][r].reshape(-1, TOPK)
        assert got_ids.shape == want_ids.shape  # one row per generated token, as stored
        total += got_ids.size
        same += int((got_ids == want_ids).sum())
        close += int(np.isclose(got_lps, want_lps, atol=2e-2).sum())  # the shards hold float16
    # Two engines (vLLM, transformers) in float32: ids may swap only where log-probs tie.
    assert same / total > 0.97 and close / total > 0.97, (same, close, total)


def _kill_teacher_replica() -> str:
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "TeacherServer" in a["name"]]
    assert replicas, "no teacher replica found"
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    return replicas[0]["name"]


def test_distillation_with_the_service_survives_a_killed_replica(service, ray_local):
    from rayjobs.distill import train

    from rayjobs.distillation.service_teacher import client_for

    killed = _kill_teacher_replica()
    client = client_for(service.distillation.teacher.service)
    started = time.monotonic()
    client.score([[1, 2, 3, 4]], [2], TOPK)  # while Serve replaces the replica
    print(f"killed {killed}; a request right after it took {time.monotonic() - started:.1f} s and "
          f"{client.retried} retries")
    started = time.monotonic()
    state = train(service, log=print)
    history = state["history"]
    print(f"run done in {time.monotonic() - started:.0f} s; last row {json.dumps(history[-1])}")
    assert state["step"] == 3 and all(r["kd"] > 0 and np.isfinite(r["loss"]) for r in history)
    assert history[-1]["teacher_scored_tokens"] > 0
    assert state["final"]["val_kd"] > 0
