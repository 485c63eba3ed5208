"""Shards of the tiny demo world made without vLLM (the generation stage's own ``StudentStage``),
shared by the cross-tokenizer and teacher-service distillation tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

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
    from datasets_pipeline.vocab_cache import tokenizer_records
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
    store = ShardStore(str(out))
    store.write_shard(0, rows, [], [r["prompt_id"] for r in rows], [], {"kept": len(rows)})
    # Training maps the stored teacher ids through the tokenizers the manifest records.
    store.write_manifest({"complete": True, "tokenizers": tokenizer_records(str(world.teacher), str(world.student))})


@pytest.fixture(scope="module")
def xtok_world(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    build_shards(tiny_world, root / "generated")
    return root


@pytest.fixture(scope="module")
def distill_config(tiny_world, xtok_world):
    """``distill_config(name, distillation) -> path``: a config over ``xtok_world``'s shards."""
    return lambda name, distillation, **sections: write_config(tiny_world, xtok_world, name, distillation, **sections)


@pytest.fixture(scope="module")
def serve_teacher(distill_config, xtok_world, ray_local):
    """``serve_teacher(name, distillation, key) -> (config, sections)``: ``raystill teacher serve`` on the
    tiny teacher (one CPU replica), left running for the module; ``sections`` make more configs for it.
    Serve is shut down after the module (not only the app: the next module starts it on its own port)."""
    import time

    from ray import serve

    from cluster.ports import free_port
    from rayjobs import teacher as teacher_job
    from rayjobs.config import load_config

    def start(name: str, distillation: dict, key: str):
        (xtok_world / "teacher-key").write_text(key)
        sections = {"teacher_service": {
            "port": free_port(), "api_key_file": str(xtok_world / "teacher-key"), "api_key_env": None,
            "max_model_len": 256, "engine_kwargs": {"dtype": "float32"}, "limits": {"max_top_k": 8},
            "autoscaling": {"min_replicas": 1, "max_replicas": 1}}}
        cfg = load_config(distill_config(name, distillation, **sections))
        started = time.monotonic()
        teacher_job.run(cfg, log=print, block=False)
        print(f"teacher service ready in {time.monotonic() - started:.0f} s")
        return cfg, sections

    yield start
    serve.shutdown()


def write_config(world, root: Path, name: str, distillation: dict, **sections) -> Path:
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
        **sections,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
