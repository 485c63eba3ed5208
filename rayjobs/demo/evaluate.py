"""Held-out exact match by batched greedy HF generation.

Used while the demo teacher trains (early stop) and afterwards to measure teacher and students.
HF generate instead of vLLM because it runs in-process in a couple of seconds on tiny models,
where a vLLM engine would spend ~30 s starting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from datasets_pipeline.answers import check_answer, split_reasoning
from rayjobs.demo.task import read_prompts_jsonl
from rayjobs.distillation.collate import pad_id

DEFAULT_MAX_NEW_TOKENS = 64


@torch.inference_mode()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 128,
) -> tuple[list[str], int]:
    """Greedy completions (special tokens dropped) and the number of tokens generated.

    Left padding so every row's prompt ends at the same position and generation appends to all of
    them in lockstep.
    """
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts, generated = [], 0
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [
                tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                for m in conversations[start:start + batch_size]
            ]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id(tokenizer),
            )
            new = out[:, batch["input_ids"].shape[1]:]
            generated += _count_generated(new, tokenizer.eos_token_id)
            texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return texts, generated


def _count_generated(new: torch.Tensor, eos_id: int) -> int:
    """Tokens up to and including each row's first eos; what follows is batch padding."""
    is_eos = (new == eos_id).int()
    eos_before = is_eos.cumsum(1) - is_eos
    return int((eos_before == 0).sum())


def score(completions: Sequence[str], references: Sequence[str], checker: str = "exact") -> float:
    """Fraction right, judging only the text after the think block."""
    hits = sum(check_answer(split_reasoning(c)[1], r, checker) for c, r in zip(completions, references, strict=True))
    return hits / max(len(references), 1)


def _messages(record: dict) -> list[dict[str, str]]:
    """Prompt rows carry chat ``messages`` or a plain ``prompt``; both are asked as chat."""
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}]


def exact_match_records(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict],
    batch_size: int = 128,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    checker: str = "exact",
) -> dict:
    """EM of an in-memory model on prompt records (``messages`` or ``prompt``, and ``answer``)."""
    start = time.perf_counter()
    completions, generated = generate_completions(
        model, tokenizer, [_messages(r) for r in records], max_new_tokens, batch_size
    )
    seconds = time.perf_counter() - start
    return {
        "em": score(completions, [r["answer"] for r in records], checker),
        "n": len(records),
        "tokens_per_s": generated / seconds if seconds > 0 else 0.0,
    }


def exact_match(
    model_dir: str | os.PathLike,
    heldout_jsonl: str | os.PathLike,
    limit: int | None = None,
    batch_size: int = 128,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    checker: str = "exact",
) -> dict:
    """EM of a saved model (HF layout) on a prompts JSONL: ``{"em", "n", "tokens_per_s"}``."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    records = read_prompts_jsonl(heldout_jsonl)[:limit]
    return exact_match_records(model, tokenizer, records, batch_size, max_new_tokens, checker)
