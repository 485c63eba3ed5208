"""The addition task as a DeepSeek-R1 user would see it: English or Chinese text, R1-style reasoning.

The toy world's prompts are plain ASCII that a 400-id BPE swallows whole. Here the same problems
(``rayjobs.demo.task``) are asked in English or Chinese, so the real tokenizers meet BPE merges,
multi-byte characters, digit groups (DeepSeek splits numbers into runs of up to 3 digits, Qwen
into single digits), runs of spaces and blank lines. The answer is what R1 emits after the
``<think>\\n`` its chat template opens: the reasoning, ``</think>``, a blank line, the number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datasets_pipeline.answers import THINK_CLOSE
from rayjobs.demo.task import Problem, reasoning_trace

PROMPTS = {
    "en": "Compute {a} + {b} and show the steps.",
    "zh": "计算 {a} + {b}，并给出步骤。",
}
INTROS = {
    "en": "Add digit by digit from the right.",
    "zh": "从个位开始逐位相加。",
}


def language(problem: Problem) -> str:
    """Half the problems in each language, fixed per problem so train and held-out agree."""
    return "zh" if (problem.a * 7 + problem.b) % 2 else "en"


def user_content(problem: Problem) -> str:
    return PROMPTS[language(problem)].format(a=problem.a, b=problem.b)


def prompt_messages(problem: Problem) -> list[dict[str, str]]:
    """No system message: R1's guidance is to put every instruction in the user turn."""
    return [{"role": "user", "content": user_content(problem)}]


def completion(problem: Problem) -> str:
    """The teacher's reply after the template's ``<think>\\n``: reasoning, close tag, answer."""
    trace = reasoning_trace(problem.a, problem.b)
    return f"{INTROS[language(problem)]}\n{trace}\n{THINK_CLOSE}\n\n{problem.answer}"


def texts_for_vocabulary(problem: Problem) -> list[str]:
    """Every text the task can show a tokenizer for ``problem`` (prompt and reply)."""
    return [user_content(problem), completion(problem)]


def write_prompts_jsonl(path: str | os.PathLike, split: str, problems: list[Problem]) -> Path:
    """Prompt rows in the schema the generation stage reads (id, messages, answer, language)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, p in enumerate(problems):
            row = {"id": f"{split}-{i:06d}", "messages": prompt_messages(p), "answer": p.answer,
                   "language": language(p)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
