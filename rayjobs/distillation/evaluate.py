"""Held-out evaluation of the merged student, and the gate that decides whether it ships.

Data: the generated shards' ``val`` split (first sample of each prompt, up to ``limit``). Val prompts
are not rejection-sampled, so the teacher's wrong answers are there too. Each row has the prompt,
the reference answer (when the source had one), the teacher's answer and the teacher's tokens in
the student's vocabulary, which gives four measures:

* ``em``: the student's final answer (after the think block) checked against the reference with
  the generation stage's checker; ``token_f1``: SQuAD-style token F1 of the normalized answers.
* ``teacher_agreement``: the student's answer checked against the teacher's answer.
* ``perplexity``: exp of the student's token-mean cross-entropy on the teacher's outputs.
* ``tokens_per_s``: greedy generation throughput (transformers batched ``generate``, left padding).

HF generate rather than vLLM: tiny students evaluate in seconds in-process, where a vLLM engine
would spend ~30 s starting. ``generate_greedy`` is also the demo world's evaluation
(``rayjobs.demo.evaluate``). ``check_gate`` and the metric helpers are pure.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from datasets_pipeline.answers import check_answer, normalize_answer, split_reasoning
from rayjobs.distillation.config import GateConfig

EVAL_COLUMNS = ["prompt_id", "sample_index", "split", "messages", "reference", "answer", "input_ids", "prompt_len",
                "teacher_offset"]


def token_f1(predicted: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after ``normalize_answer`` (SQuAD)."""
    pred, ref = normalize_answer(predicted).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_metrics(
    completions: Sequence[str], references: Sequence[str | None], teacher_answers: Sequence[str], checker: str
) -> dict:
    """EM and F1 over rows with a reference; agreement with the teacher over all rows."""
    answers = [split_reasoning(c)[1] for c in completions]
    scored = [(a, r) for a, r in zip(answers, references, strict=True) if r is not None]
    em = sum(check_answer(a, r, checker) for a, r in scored) / len(scored) if scored else None
    f1 = sum(token_f1(a, r) for a, r in scored) / len(scored) if scored else None
    agree = [check_answer(a, t, checker) for a, t in zip(answers, teacher_answers, strict=True)]
    return {
        "em": em,
        "token_f1": f1,
        "teacher_agreement": sum(agree) / len(agree) if agree else None,
        "n_with_reference": len(scored),
    }


def check_gate(report: dict, gate: GateConfig) -> dict:
    """``{"passed", "checks"}``; a threshold whose metric is missing (no references) fails."""
    checks = []
    for metric, threshold in (("em", gate.min_em), ("teacher_agreement", gate.min_teacher_agreement)):
        if threshold is None:
            continue
        value = report.get(metric)
        checks.append({"metric": metric, "value": value, "min": threshold,
                       "passed": value is not None and value >= threshold})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def select_eval_records(table, limit: int | None) -> list[dict]:
    """First sample of each ``val`` prompt of ``table`` (the samples' ``EVAL_COLUMNS``), in
    prompt-id order (deterministic across runs)."""
    import pyarrow.compute as pc

    table = table.filter(pc.equal(table["split"], "val"))
    rows = sorted(table.to_pylist(), key=lambda r: (r["prompt_id"], r["sample_index"]))
    first, seen = [], set()
    for row in rows:
        if row["prompt_id"] not in seen:
            seen.add(row["prompt_id"])
            first.append(row)
    return first[:limit] if limit else first


@dataclass(frozen=True)
class Generations:
    """Greedy completions (special tokens dropped), the tokens generated and the seconds it took."""

    texts: list[str]
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


def count_generated(new, eos_id: int) -> int:
    """Tokens up to and including each row's first eos; what follows is batch padding."""
    is_eos = (new == eos_id).int()
    return int(((is_eos.cumsum(1) - is_eos) == 0).sum())


def generate_greedy(model, tokenizer, conversations: Sequence[list[dict]], max_new_tokens: int,
                    batch_size: int) -> Generations:
    """Batched greedy completions of chat ``conversations`` (the held-out eval and the demo world's).

    Left padding so every row's prompt ends at the same position and generation appends to all of
    them in lockstep. The model generates in eval mode and gets its mode back: the demo teacher is
    evaluated in the middle of its training.
    """
    import torch

    from datasets_pipeline.targets import render_prompt
    from rayjobs.distillation.collate import pad_id

    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts, generated, start = [], 0, time.perf_counter()
    try:
        for first in range(0, len(conversations), batch_size):
            prompts = [render_prompt(tokenizer, m) for m in conversations[first:first + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id(tokenizer))
            new = out[:, batch["input_ids"].shape[1]:]
            generated += count_generated(new, tokenizer.eos_token_id)
            texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return Generations(texts, generated, time.perf_counter() - start)


def _speaks_student_tokens(tokenizer, record: dict) -> bool:
    """Whether ``input_ids`` (student tokens) are this model's tokens: its prompt encodes the same."""
    from datasets_pipeline.targets import render_prompt

    prompt = render_prompt(tokenizer, json.loads(record["messages"]))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return list(ids) == list(record["input_ids"][: record["prompt_len"]])


def _perplexity(model, tokenizer, records: list[dict], batch_size: int, max_seq_len: int,
                chunk_tokens: int | None) -> float | None:
    """exp(token-mean CE) of the model on the teacher's outputs in student tokens (prompt excluded).

    None for a model with another tokenizer (e.g. the teacher evaluated as a baseline): the stored
    token ids would mean other tokens to it. The head runs ``chunk_tokens`` positions at a time
    (``rayjobs.distillation.chunked_head``): no batch's full-vocabulary logits are held.
    """
    import torch

    from rayjobs.distillation.chunked_head import call_head, no_logits, output_head
    from rayjobs.distillation.collate import CollateSettings, collate, model_inputs, pad_id
    from rayjobs.distillation.losses import LossSettings

    rows = [r for r in records if r["input_ids"]]
    if not rows or not _speaks_student_tokens(tokenizer, rows[0]):
        return None
    settings = CollateSettings(pad_id=pad_id(tokenizer), max_seq_len=max_seq_len, with_teacher=False)
    nll, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate({k: [r[k] for r in chunk] for k in ("input_ids", "prompt_len", "teacher_offset")}, settings)
        with torch.inference_mode():
            inputs = {k: v.to(model.device) for k, v in model_inputs(batch).items()}
            states = model(**inputs, output_hidden_states=True, logits_to_keep=no_logits(model.device)).hidden_states
            out = call_head(output_head(model), states[-1], batch["labels"].to(model.device), None, LossSettings(),
                            chunk_tokens)
        nll += float(out.ce) * int(out.num_tokens)
        count += int(out.num_tokens)
    return math.exp(nll / count) if count else None


def evaluate_model(
    model_dir: str,
    records: list[dict],
    *,
    checker: str,
    max_new_tokens: int,
    limit: int | None = None,
    batch_size: int = 64,
    max_seq_len: int = 2048,
    device: str = "cpu",
    num_examples: int = 5,
    chunk_tokens: int | None,
) -> dict:
    """The eval report (JSON-serializable) of a saved HF model on ``records`` (``select_eval_records``).

    ``chunk_tokens``: ``distillation.loss.chunk_tokens``, for the perplexity's chunked head.
    """
    import torch
    from transformers import AutoTokenizer

    from rayjobs.distillation.lora import load_model

    records = records[:limit] if limit else records
    report: dict = {"model": model_dir, "n": len(records), "checker": checker, "max_new_tokens": max_new_tokens}
    if not records:
        return {**report, "em": None, "token_f1": None, "teacher_agreement": None, "perplexity": None,
                "tokens_per_s": None, "note": "no 'val' rows in the shards (generation.preprocess.val_fraction)"}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, dtype=torch.float32).to(device).eval()
    generations = generate_greedy(model, tokenizer, [json.loads(r["messages"]) for r in records], max_new_tokens,
                                  batch_size)
    completions = generations.texts
    report.update(answer_metrics(completions, [r["reference"] for r in records], [r["answer"] for r in records],
                                 checker))
    report.update(
        # Never past the model's own positions (distillation.context_policy truncates training alike).
        perplexity=_perplexity(model, tokenizer, records, batch_size,
                               min(max_seq_len, getattr(model.config, "max_position_embeddings", max_seq_len)),
                               chunk_tokens),
        generated_tokens=generations.tokens,
        generation_s=generations.seconds,
        tokens_per_s=generations.tokens_per_s,
        examples=[{"prompt_id": r["prompt_id"], "reference": r["reference"], "teacher": r["answer"],
                   "student": split_reasoning(c)[1], "completion": c}
                  for r, c in zip(records[:num_examples], completions, strict=False)],
    )
    return report
