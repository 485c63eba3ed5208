"""Parse reasoning-model outputs and decide whether a final answer is right.

Pure Python on purpose: the generation stage calls these inside Ray Data batches, the gate calls
them after training and the demo calls them while building its teacher, and none of those should
pay for (or break on) an engine import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from fractions import Fraction

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Thousands-grouped numbers are tried first so "1,234" is one number and not "1" and "234".
_NUMBER = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
    r"|[-+]?\.\d+(?:[eE][-+]?\d+)?"
)
_WHITESPACE = re.compile(r"\s+")
_EDGE_PUNCTUATION = ".,;:!?\"'`"

NUMERIC_REL_TOL = 1e-6
NUMERIC_ABS_TOL = 1e-9


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split an R1-style completion into (reasoning, final answer).

    R1 chat templates often put the opening ``<think>`` in the prompt, so a completion may hold
    only the closing tag; that is still a finished trace. An opening tag that never closes means
    the model ran out of tokens mid-thought: everything is reasoning and there is no answer, which
    must not be mistaken for an answer the checker could accept. Text without any tag is all answer
    (reasoning is None, not "", so callers can tell "no trace" from "empty trace").
    """
    open_at = text.find(THINK_OPEN)
    close_at = text.find(THINK_CLOSE, open_at + len(THINK_OPEN) if open_at >= 0 else 0)
    if open_at >= 0 and close_at < 0:
        return text[open_at + len(THINK_OPEN):].strip(), ""
    if close_at < 0:
        return None, text.strip()
    start = open_at + len(THINK_OPEN) if open_at >= 0 else 0
    return text[start:close_at].strip(), text[close_at + len(THINK_CLOSE):].strip()


def normalize_answer(s: str) -> str:
    """Canonical form for exact comparison.

    Models vary case, spacing and a trailing full stop without changing the answer; those
    differences must not count as mistakes, while everything else (digits, signs, words) must.
    """
    return _WHITESPACE.sub(" ", s).strip().strip(_EDGE_PUNCTUATION).strip().lower()


def parse_number(s: str) -> Fraction | None:
    """The last number written in ``s``, exactly, or None.

    The last one because models state the result at the end ("3 + 4 = 7"); exact fractions so
    large integers compare exactly rather than through a lossy float.
    """
    matches = _NUMBER.findall(s)
    if not matches:
        return None
    token = matches[-1].replace(",", "")
    try:
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def exact_checker(predicted: str, reference: str) -> bool:
    """Equal after normalization; for answers that are words or formatted strings."""
    return normalize_answer(predicted) == normalize_answer(reference)


def numeric_checker(predicted: str, reference: str) -> bool:
    """Same number, whatever the formatting ("1,234" vs "1234.0").

    The tolerance only rescues decimals that were rounded differently; two different integers
    are never "close", however large (a relative tolerance would accept an off-by-one answer of
    seven digits).
    """
    got, want = parse_number(predicted), parse_number(reference)
    if got is None or want is None:
        return False
    if got == want:
        return True
    if got.denominator == 1 and want.denominator == 1:
        return False
    return math.isclose(float(got), float(want), rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_ABS_TOL)


CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "exact": exact_checker,
    "numeric": numeric_checker,
}


def check_answer(predicted: str, reference: str, mode: str = "exact") -> bool:
    """Dispatch by name so configs can pick a checker with a string."""
    try:
        checker = CHECKERS[mode]
    except KeyError:
        raise ValueError(f"unknown checker {mode!r}; known: {sorted(CHECKERS)}") from None
    return checker(predicted, reference)
