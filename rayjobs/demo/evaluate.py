"""Held-out exact match by batched greedy HF generation (``rayjobs.distillation.evaluate.generate_greedy``).

Used while the demo teacher trains (early stop) and afterwards to measure teacher and students.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from datasets_pipeline.answers import check_answer, split_reasoning
from rayjobs.demo.task import read_prompts_jsonl
from rayjobs.distillation.evaluate import generate_greedy
from rayjobs.distillation.lora import load_model

DEFAULT_MAX_NEW_TOKENS = 64


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
    generations = generate_greedy(model, tokenizer, [_messages(r) for r in records], max_new_tokens, batch_size)
    return {
        "em": score(generations.texts, [r["answer"] for r in records], checker),
        "n": len(records),
        "tokens_per_s": generations.tokens_per_s or 0.0,
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
    model = load_model(model_dir, dtype=torch.float32)
    records = read_prompts_jsonl(heldout_jsonl)[:limit]
    return exact_match_records(model, tokenizer, records, batch_size, max_new_tokens, checker)


def heldout_ce(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[dict]) -> float:
    """Token-mean cross-entropy of the task's reference completions (the teacher's trace format, eos
    included) after each record's chat prompt; the prompt is not scored. A held-out loss that needs no
    generation, for comparing starting points (``rayjobs.distillation.student_init``)."""
    import re

    from datasets_pipeline.targets import render_prompt
    from rayjobs.demo.task import Problem, assistant_content

    nll, count = 0.0, 0
    model.eval()
    for record in records:
        a, b = map(int, re.search(r"(\d+) \+ (\d+)", _messages(record)[-1]["content"]).groups())
        prompt = tokenizer(render_prompt(tokenizer, _messages(record)), add_special_tokens=False)["input_ids"]
        target = tokenizer(assistant_content(Problem(a, b)), add_special_tokens=False)["input_ids"]
        target = [*target, tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target], device=model.device)).logits[0, len(prompt) - 1:-1]
        nll += float(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(target, device=model.device),
                                                       reduction="sum"))
        count += len(target)
    return nll / count if count else float("nan")
