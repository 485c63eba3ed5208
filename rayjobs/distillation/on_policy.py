"""On-policy batches (GKD's lambda): the student's own continuations, laid out as collate's columns.

Why: off-policy KD trains the student on the teacher's text, a distribution it never produces
itself at inference, so its errors compound on its own prefixes. On-policy distillation (GKD,
Agarwal et al. 2024; Qwen3's recipe) samples continuations from the current student and has the
teacher score *those* tokens; the loss (reverse KL by default) is then on the student's own
trajectories.

Which micro-batches are on-policy: a seeded hash of the batch's prompts, compared with
``on_policy.fraction``. It is decided in the collate (Ray Data's prefetch threads), so an
off-policy batch's service call still overlaps compute and an on-policy batch costs no wasted
scoring of the stored sample; and it is a function of the data alone, so a resumed run, replaying
the same batches, makes the same choices without any schedule state to restore.

An on-policy batch leaves the collate as ``OnPolicyRows`` (the student prompts and messages); the
train loop samples continuations (``rayjobs.distillation.sampler``) and ``continuation_columns``
turns them into the columns the stored path has, so the service scoring
(``service_teacher.ServiceTopK``) and ``collate`` run unchanged: same tokenizer, the teacher
scores the student's ids verbatim (``teacher_offset`` = prompt length); cross-tokenizer, the
sampled text is re-tokenized by the teacher and aligned over characters exactly as the
generation stage aligns its samples (``datasets_pipeline.alignment.align_tokens``).

Pure: numpy and the tokenizers' callables, no Ray, torch or vLLM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from datasets_pipeline.alignment import NO_ALIGN, align_tokens

Decode = Callable[[Sequence[int]], str]
Encode = Callable[[str], list[int]]


def chosen(messages: Sequence[str], fraction: float, seed: int) -> bool:
    """Whether the micro-batch with these prompts is on-policy: a uniform draw keyed by them and ``seed``."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    digest = hashlib.sha256(f"{seed}\0".encode() + "\0".join(messages).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


@dataclass(frozen=True)
class OnPolicyRows:
    """An on-policy micro-batch as it leaves the collate: what sampling needs, nothing scored yet."""

    prompts: list[list[int]]  # the student's chat-rendered prompt ids
    messages: list[str]  # JSON chat messages (the teacher renders its own prompt from them)

    def __len__(self) -> int:
        return len(self.prompts)


def rows_of(batch: Mapping[str, Sequence]) -> OnPolicyRows:
    """The prompts of a batch of stored samples (``input_ids[:prompt_len]``); the stored targets are dropped."""
    return OnPolicyRows([[int(t) for t in batch["input_ids"][r][: int(batch["prompt_len"][r])]]
                         for r in range(len(batch["input_ids"]))],
                        [str(m) for m in batch["messages"]])


class OnPolicyCollate:
    """``ServiceCollate`` for off-policy batches; ``OnPolicyRows`` for the chosen ones."""

    def __init__(self, off_policy, fraction: float, seed: int):
        self.off_policy, self.fraction, self.seed = off_policy, fraction, seed

    def __call__(self, batch: Mapping[str, Sequence]):
        if chosen([str(m) for m in batch["messages"]], self.fraction, self.seed):
            return rows_of(batch)
        return self.off_policy(batch)


def token_budgets(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int) -> list[int]:
    """New tokens each prompt may get: ``max_new_tokens``, less where the student's context ends (at least 1)."""
    return [max(1, min(max_new_tokens, max_seq_len - len(p))) for p in prompts]


def teacher_view(generated: Sequence[int], student_eos: int | None, teacher_eos: int | None,
                 student_decode: Decode, teacher_encode: Encode, teacher_decode: Decode) -> tuple[list[int], list[int]]:
    """Cross-tokenizer: ``(teacher ids, alignment)`` of a sampled continuation, as the generation stage stores them.

    The text is the student's decoding; the teacher tokenizes it (and ends with its eos where the
    student ended with its own, both aligned at the end of the text). The alignment is empty when
    the two tokenizations do not decode to the same text: that row then trains on nothing.
    """
    ended = bool(generated) and student_eos is not None and int(generated[-1]) == student_eos
    body = [int(t) for t in (generated[:-1] if ended else generated)]
    text = student_decode(body)
    teacher_ids = list(teacher_encode(text)) + ([teacher_eos] if ended and teacher_eos is not None else [])
    ids = body + ([student_eos] if ended else [])
    align = align_tokens(student_decode, ids, teacher_decode, teacher_ids, text)
    return teacher_ids, ([] if all(a == NO_ALIGN for a in align) else align)


def continuation_columns(rows: OnPolicyRows, generated: Sequence[Sequence[int]],
                         cross: Callable[[Sequence[int]], tuple[list[int], list[int]]] | None = None) -> dict:
    """Sampled continuations -> the sample columns ``ServiceTopK`` and ``collate`` read.

    ``cross`` (``teacher_view`` bound to the tokenizers) for a student whose vocabulary is not the
    teacher's; None: the teacher scores the student's ids as they are (``teacher_offset``).
    """
    if len(generated) != len(rows):
        raise ValueError(f"{len(generated)} continuations for {len(rows)} prompts")
    cols: dict[str, list] = {c: [] for c in ("input_ids", "prompt_len", "teacher_offset", "teacher_token_ids",
                                             "teacher_align", "messages")}
    for prompt, gen, messages in zip(rows.prompts, generated, rows.messages, strict=True):
        gen = [int(t) for t in gen]
        teacher_ids, align = (gen, []) if cross is None else cross(gen)
        cols["input_ids"].append(np.asarray(list(prompt) + gen, np.int64))
        cols["prompt_len"].append(len(prompt))
        cols["teacher_offset"].append(len(prompt) if cross is None else -1)
        cols["teacher_token_ids"].append(np.asarray(teacher_ids, np.int64))
        cols["teacher_align"].append(np.asarray(align, np.int64))
        cols["messages"].append(messages)
    cols["prompt_len"] = np.asarray(cols["prompt_len"], np.int64)
    cols["teacher_offset"] = np.asarray(cols["teacher_offset"], np.int64)
    return cols


@dataclass
class RolloutStats:
    """One optimizer step's on-policy work on this rank, for the curve row."""

    batches: int = 0
    sampled_tokens: int = 0
    sample_s: float = 0.0
    scored_tokens: int = 0
    score_s: float = 0.0
    lag: int = 0

    def add(self, sampled: int, sample_s: float, scored: int, score_s: float, lag: int) -> None:
        self.batches += 1
        self.sampled_tokens += sampled
        self.sample_s += sample_s
        self.scored_tokens += scored
        self.score_s += score_s
        self.lag = max(self.lag, lag)

    def row(self) -> dict:
        """Curve columns (rank 0's view): rates over the time spent sampling and scoring, the largest lag;
        a step without on-policy batches has only the count (no rate or lag to speak of)."""
        if not self.batches:
            return {"on_policy_batches": 0}
        return {"on_policy_batches": self.batches, "sampled_tokens": self.sampled_tokens,
                "sampled_tokens_per_s": self.sampled_tokens / self.sample_s if self.sample_s else 0.0,
                "scored_tokens_per_s": self.scored_tokens / self.score_s if self.score_s else 0.0,
                "policy_lag": self.lag}


def cross_view(student_tok, teacher_tok) -> Callable[[Sequence[int]], tuple[list[int], list[int]]] | None:
    """``teacher_view`` bound to two HF tokenizers; None when they share a vocabulary (ids go as they are)."""
    from datasets_pipeline.alignment import tokenizer_decoder
    from datasets_pipeline.targets import same_vocabulary

    if same_vocabulary(student_tok, teacher_tok):
        return None
    s_decode, t_decode = tokenizer_decoder(student_tok), tokenizer_decoder(teacher_tok)

    def encode(text: str) -> list[int]:
        return teacher_tok(text, add_special_tokens=False)["input_ids"]

    return lambda generated: teacher_view(generated, student_tok.eos_token_id, teacher_tok.eos_token_id,
                                          s_decode, encode, t_decode)
