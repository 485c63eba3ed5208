"""A small plain-PyTorch SFT loop for causal LMs, used only to build the demo teacher.

Deliberately not the distillation trainer (Ray Train + DeepSpeed): the demo world must exist
before any of that machinery is exercised, and must be buildable in one process in minutes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rayjobs.distillation.collate import pad_id

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTSettings:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    log_every: int = 10
    target_em: float | None = None


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[dict[str, str]], completion: str
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one chat turn, learning only the assistant's reply and its eos.

    The prompt is rendered with the generation prompt and the reply appended, so training sees
    exactly the token boundary that inference will see.
    """
    prompt = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    completion_ids = tokenizer.encode(completion + tokenizer.eos_token, add_special_tokens=False)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example in the batch."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lr_at(step: int, settings: SFTSettings) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak at ``settings.steps``."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(settings.steps - settings.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def train_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Iterator[tuple[list[int], list[int]]],
    settings: SFTSettings,
    evaluate: Callable[[], float] | None = None,
    progress: Callable[[str], None] = print,
) -> dict:
    """Train in place for ``settings.steps`` steps, or fewer once ``evaluate()`` reaches the target.

    ``evaluate`` is a callable rather than data so the caller decides what "good enough" means
    (here: greedy exact match on a small validation sample) and how much it may cost.
    """
    # No weight decay: every batch is fresh problems from an endless stream, so there is no fixed
    # training set to overfit.
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    evals: list[tuple[int, float]] = []
    tokens, loss_sum, loss_n, last_loss = 0, 0.0, 0, 0.0
    start = time.perf_counter()
    step = 0
    for step in range(1, settings.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, settings)
        batch = collate([next(examples) for _ in range(settings.batch_size)], pad_id(tokenizer))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        tokens += int(batch["attention_mask"].sum())
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if step % settings.log_every == 0:
            last_loss, loss_sum, loss_n = loss_sum / loss_n, 0.0, 0
            elapsed = time.perf_counter() - start
            progress(f"step {step}/{settings.steps} loss {last_loss:.4f} lr {lr_at(step - 1, settings):.2e} "
                     f"{tokens / elapsed:.0f} tok/s {elapsed:.0f}s")
        if evaluate is not None and step % settings.eval_every == 0:
            em = evaluate()
            evals.append((step, em))
            progress(f"step {step} eval em {em:.3f}")
            if settings.target_em is not None and em >= settings.target_em:
                progress(f"target em {settings.target_em} reached at step {step}; stopping")
                break
    if loss_n:
        last_loss = loss_sum / loss_n
    model.eval()
    seconds = time.perf_counter() - start
    return {
        "steps": step,
        "loss": last_loss,
        "evals": evals,
        "seconds": seconds,
        "train_tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }
