"""Build the student's training sequence from a teacher sample.

The student sees the prompt through *its own* chat template, and the teacher's
answer as the target. When both models share a vocabulary and the reasoning is
kept, the target is the teacher's generated token ids verbatim, so stored top-k
logprobs line up position by position (``teacher_offset``). Otherwise the target
is re-tokenized text; with the reasoning kept, teacher and student tokens are
aligned over the completion's characters (``teacher_align``, see
``datasets_pipeline.alignment``) for cross-tokenizer distillation. A stripped
target has no alignment: the teacher's distributions were conditioned on the
reasoning the student never sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from datasets_pipeline.alignment import align_tokens, tokenizer_decoder


@dataclass(frozen=True)
class StudentExample:
    input_ids: list[int]
    prompt_len: int
    teacher_offset: int
    teacher_align: list[int] = field(default_factory=list)


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
    teacher_decode: Callable[[Sequence[int]], str] | None = None,
) -> StudentExample:
    """Raise TooLong when prompt + target exceed the student's context.

    ``teacher_decode`` (the teacher tokenizer's, see ``alignment.tokenizer_decoder``) turns on the
    cross-tokenizer alignment for re-tokenized targets with the reasoning kept.
    """
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
    align = []
    if not verbatim and reasoning_policy == "keep" and teacher_decode is not None and teacher_token_ids:
        align = align_tokens(tokenizer_decoder(tokenizer), target, teacher_decode, teacher_token_ids, completion)
        if all(a < 0 for a in align):
            align = []
    return StudentExample(
        input_ids=list(prompt_ids) + target,
        prompt_len=len(prompt_ids),
        teacher_offset=len(prompt_ids) if verbatim else -1,
        teacher_align=align,
    )
