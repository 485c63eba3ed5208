"""A 152k-vocabulary student distilled under Ray Train + DeepSpeed (ZeRO-3) without full logits.

The student has Qwen2.5's vocabulary size (151,936 embedding rows, random-initialised, tied) on
two tiny layers; its tokenizer is a small BPE, so the task's tokens are a few hundred ids while
every softmax runs over all 151,936. The stored teacher's top-k puts mass on the written token and
on ids drawn from the whole vocabulary, so KD reaches far rows of the head. 100 optimizer steps of
48 samples (about 1,900 tokens per micro-batch) run through the whole stage: training,
the merge and the held-out eval (chunked perplexity, greedy generation).

"Without materializing full logits": one micro-batch's fp32 logits are about 1.1 GiB here, and
the unchunked loss held about five such tensors at once (logits, upcast, softmax and gradients,
see bench/vocab_memory.py). The worker's peak memory (curves' ``peak_mem_mib``, its peak RSS)
must stay below one of them on top of what a process with Python, torch, Ray and DeepSpeed holds.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

VOCAB, TOPK, STEPS, BATCH = 151_936, 4, 100, 48
PROCESS_MIB = 1536  # Python + torch + Ray + DeepSpeed + the tiny model and its optimizer, generously


def _text(a: int, b: int) -> tuple[str, str]:
    answer = str(a + b)
    return f"<think>\n{a}+{b}={answer}\n</think>\n{answer}", answer


def _student(out: Path):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from rayjobs.demo.tokenizers import save_tokenizer, train_chat_tokenizer

    rng = random.Random(0)
    corpus = []
    for _ in range(200):
        a, b = rng.randint(10, 99999), rng.randint(10, 99999)
        corpus.append([{"role": "user", "content": f"What is {a}+{b}?"},
                       {"role": "assistant", "content": _text(a, b)[0]}])
    tok = train_chat_tokenizer(corpus, vocab_size=300, model_max_length=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return tok


def _shards(out: Path, tok, n: int, val: int) -> None:
    from datasets_pipeline.shards import ShardStore
    from datasets_pipeline.targets import render_prompt

    rng = random.Random(1)
    rows = []
    for i in range(n + val):
        a, b = rng.randint(10, 99999), rng.randint(10, 99999)
        messages = [{"role": "user", "content": f"What is {a}+{b}?"}]
        completion, answer = _text(a, b)
        prompt = tok(render_prompt(tok, messages), add_special_tokens=False)["input_ids"]
        target = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = [t for token in target for t in (token, *rng.sample(range(len(tok), VOCAB), TOPK - 1))]
        lps = np.tile(np.log([0.85, 0.06, 0.03, 0.01]), len(target)).astype(np.float16)
        rows.append({
            "sample_id": f"v{i}/0", "prompt_id": f"v{i:05d}", "sample_index": 0,
            "split": "val" if i >= n else "train", "messages": json.dumps(messages), "reference": answer,
            "completion": completion, "reasoning": None, "answer": answer, "verified": True,
            "teacher_token_ids": target, "topk_k": TOPK, "topk_ids": ids, "topk_logprobs": lps,
            "input_ids": prompt + target, "prompt_len": len(prompt), "teacher_offset": len(prompt),
            "teacher_align": [],
        })
    ShardStore(str(out)).write_shard(0, rows, [], [r["prompt_id"] for r in rows], [], {"kept": len(rows)})


def test_152k_vocabulary_student_distills_without_full_logits(tmp_path, ray_local):
    from rayjobs.config import load_config
    from rayjobs.distill import run

    tok = _student(tmp_path / "student")
    _shards(tmp_path / "generated", tok, n=STEPS * BATCH // 4, val=8)
    cfg = {
        "name": "vocab152k", "runs_root": str(tmp_path / "runs"),
        "generation": {"teacher": "unused-here", "input": {"path": str(tmp_path / "prompts.jsonl")},
                       "output": str(tmp_path / "generated"),
                       "sampling": {"max_new_tokens": 32, "logprobs_topk": TOPK}, "preprocess": {"checker": "numeric"}},
        "distillation": {
            "student": str(tmp_path / "student"), "output": str(tmp_path / "out"), "max_seq_len": 96,
            "loss": {"kind": "logit", "alpha": 0.5},
            "optim": {"lr": 1e-2, "max_steps": STEPS, "micro_batch_size": BATCH, "warmup_ratio": 0.05},
            "deepspeed": {"zero_stage": 3}, "scaling": {"num_workers": 1},
            "checkpoint_every": STEPS, "eval": {"limit": 8, "max_new_tokens": 32},
        },
    }
    path = tmp_path / "vocab152k.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = run(load_config(path))

    rows = [json.loads(line) for line in (tmp_path / "out" / "curves.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in rows)
    first, last = (sum(r["loss"] for r in part) / len(part) for part in (rows[:10], rows[-10:]))
    assert last < 0.5 * first, (first, last)  # from ~ln(151,936) = 11.9 down
    tokens = max(r["tokens"] for r in rows)
    full_logits_mib = tokens * VOCAB * 4 / 2**20
    peak = max(r["peak_mem_mib"] for r in rows)
    assert full_logits_mib > 900  # the bound below means something
    assert peak < PROCESS_MIB + full_logits_mib, (peak, full_logits_mib)
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["n"] == 8 and math.isfinite(report["perplexity"])
    assert summary["steps"] == STEPS
