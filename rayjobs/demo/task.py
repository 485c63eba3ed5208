"""The demo's synthetic reasoning task: multi-digit addition with a written-out carry trace.

Addition is checkable exactly, so the whole pipeline (teacher generation, rejection sampling,
distillation, the gate) can be judged by exact match without a human or a reward model. The trace
is the schoolbook algorithm, one fixed-width step per digit from the least significant end:

    <think>
    7+5+0=12
    4+8+1=13
    0+9+1=10
    </think>
    1032

Each step is ``a_digit+b_digit+carry_in=two_digit_sum``: the second digit of the sum is the answer
digit and the first is the next carry. Fixed width keeps the positions a small model must attend to
regular, which is what lets a 1M-parameter teacher learn it on two CPU cores in minutes.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from datasets_pipeline.answers import THINK_CLOSE, THINK_OPEN


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def key(self) -> tuple[int, int]:
        """Order-free identity: 3+5 and 5+3 are the same problem for the held-out split."""
        return (min(self.a, self.b), max(self.a, self.b))


@dataclass(frozen=True)
class TaskSpec:
    """Which problems exist and how they are asked."""

    min_digits: int = 2
    max_digits: int = 3
    system_prompt: str | None = None

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")


def _operand(rng: random.Random, spec: TaskSpec) -> int:
    digits = rng.randint(spec.min_digits, spec.max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def sample_problem(rng: random.Random, spec: TaskSpec) -> Problem:
    """Operand lengths are drawn first so short numbers are as common as long ones."""
    return Problem(_operand(rng, spec), _operand(rng, spec))


def reasoning_trace(a: int, b: int) -> str:
    a_digits, b_digits = str(a)[::-1], str(b)[::-1]
    width = max(len(a_digits), len(b_digits))
    steps, carry = [], 0
    for i in range(width):
        x = int(a_digits[i]) if i < len(a_digits) else 0
        y = int(b_digits[i]) if i < len(b_digits) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return "\n".join(steps)


def assistant_content(problem: Problem) -> str:
    """The R1-style target: trace inside think tags, then only the number."""
    return f"{THINK_OPEN}\n{reasoning_trace(problem.a, problem.b)}\n{THINK_CLOSE}\n{problem.answer}"


def user_content(problem: Problem) -> str:
    return f"What is {problem.a} + {problem.b}?"


def prompt_messages(problem: Problem, spec: TaskSpec) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
    messages.append({"role": "user", "content": user_content(problem)})
    return messages


def training_messages(problem: Problem, spec: TaskSpec) -> list[dict[str, str]]:
    return [*prompt_messages(problem, spec), {"role": "assistant", "content": assistant_content(problem)}]


def draw_problems(spec: TaskSpec, stream: str, seed: int, n: int, exclude: Iterable[Problem] = ()) -> list[Problem]:
    """``n`` distinct problems from the named random stream, none equal to one in ``exclude``.

    Each use (held-out, train prompts, validation) has its own stream so that changing how many
    of one are drawn never changes another. Fails loudly if the problem space is too small.
    """
    rng = random.Random(f"{stream}:{seed}")
    out, seen = [], {p.key for p in exclude}
    budget = 50 * n + 1000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"cannot draw {n} distinct problems with {spec}")
        problem = sample_problem(rng, spec)
        if problem.key not in seen:
            seen.add(problem.key)
            out.append(problem)
    return out


def split_problems(spec: TaskSpec, seed: int, n_train: int, n_heldout: int) -> tuple[list[Problem], list[Problem]]:
    """Deterministic (train, held-out) lists with no problem (in either order) in both."""
    heldout = draw_problems(spec, "heldout", seed, n_heldout)
    return draw_problems(spec, "train", seed, n_train, exclude=heldout), heldout


def training_stream(spec: TaskSpec, seed: int, exclude: Iterable[Problem]) -> Iterator[Problem]:
    """Endless problems for SFT, never one from ``exclude`` (held-out and validation sets)."""
    banned = {p.key for p in exclude}
    rng = random.Random(f"stream:{seed}")
    while True:
        problem = sample_problem(rng, spec)
        if problem.key not in banned:
            yield problem


def prompt_record(row_id: str, problem: Problem, spec: TaskSpec) -> dict:
    """One prompt row in the schema the generation stage reads (id, messages, answer)."""
    return {"id": row_id, "messages": prompt_messages(problem, spec), "answer": problem.answer}


def write_prompts_jsonl(path: str | os.PathLike, split: str, problems: list[Problem], spec: TaskSpec) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, problem in enumerate(problems):
            f.write(json.dumps(prompt_record(f"{split}-{i:06d}", problem, spec)) + "\n")
    return path


def write_task_jsonl(
    out_dir: str | os.PathLike, spec: TaskSpec, seed: int, n_train: int, n_heldout: int
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` prompt files; returns their paths."""
    train, heldout = split_problems(spec, seed, n_train, n_heldout)
    out_dir = Path(out_dir)
    return (
        write_prompts_jsonl(out_dir / "train.jsonl", "train", train, spec),
        write_prompts_jsonl(out_dir / "heldout.jsonl", "heldout", heldout, spec),
    )


def read_prompts_jsonl(path: str | os.PathLike) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
