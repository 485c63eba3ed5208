"""Build the student's training sequence from a teacher sample.

The student sees the prompt through *its own* chat template, and the teacher's
answer as the target. When both models share a vocabulary and the reasoning is
kept, the target is the teacher's generated token ids verbatim, so stored top-k
logprobs line up position by position (``teacher_offset``); otherwise the target
is re-tokenized text and the training stage aligns teacher and student tokens
over the text (cross-tokenizer distillation).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudentExample:
    input_ids: list[int]
    prompt_len: int
    teacher_offset: int


class TooLong(ValueError):
    pass


def same_vocabulary(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def render_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def target_text(completion: str, answer: str, reasoning_policy: str) -> str:
    return completion if reasoning_policy == "keep" else answer


def build_student_example(
    tokenizer,
    messages: list[dict],
    completion: str,
    answer: str,
    teacher_token_ids: list[int],
    *,
    reasoning_policy: str,
    max_len: int,
    aligned_vocab: bool,
) -> StudentExample:
    """Raise TooLong when prompt + target exceed the student's context."""
    prompt_ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    verbatim = aligned_vocab and reasoning_policy == "keep"
    if verbatim:
        target = list(teacher_token_ids)
    else:
        target = tokenizer(target_text(completion, answer, reasoning_policy), add_special_tokens=False)["input_ids"]
    if eos is not None and (not target or target[-1] != eos):
        target = target + [eos]
    total = len(prompt_ids) + len(target)
    if total > max_len:
        raise TooLong(f"{total} student tokens > max_len {max_len}")
    return StudentExample(
        input_ids=list(prompt_ids) + target,
        prompt_len=len(prompt_ids),
        teacher_offset=len(prompt_ids) if verbatim else -1,
    )
