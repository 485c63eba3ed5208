"""Redact personal data from text before anything is written (served request logs, generation inputs).

Here in ``cluster/`` because both stages that write user text use it and may import only this room:
``service`` (the request log) and ``datasets_pipeline`` (inputs). Pure: ``re`` only.

Patterns, each replaced by a tag: e-mail addresses, card numbers (13-19 digits that pass the Luhn
check, spaces or dashes allowed), Chinese resident ID numbers (18 characters with a valid check
digit, or the old 15-digit form), phone numbers (Chinese mobiles ``1[3-9]`` + 9 digits, and
international/US-style numbers with separators), IPv4 and IPv6 addresses. Order matters: the
longer, checked forms (cards, IDs) are tried before the looser phone pattern.
"""

from __future__ import annotations

import re
from collections import Counter

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
CN_ID = re.compile(r"(?<![\dA-Za-z])(?:\d{17}[\dXx]|\d{15})(?![\dA-Za-z])")
CN_MOBILE = re.compile(r"(?<!\d)(?:\+?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?\(?\d{1,4}\)?(?:[ .-]\d{2,4}){2,4}|\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4})"
                   r"(?![ .-]?\d)")
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])")
IPV6 = re.compile(r"(?<![:\w])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
                  r"|(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4})(?![:\w])")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def _luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _cn_id_valid(s: str) -> bool:
    if len(s) == 15:
        return True
    check = "10X98765432"[sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS)) % 11]
    return s[17].upper() == check


def redact(text: str, counts: Counter | None = None) -> str:
    """``text`` with personal data replaced by ``[EMAIL]``, ``[CARD]``, ``[ID]``, ``[PHONE]``, ``[IP]``;
    ``counts`` (if given) is increased per tag."""
    def sub(pattern: re.Pattern, tag: str, text: str, valid=None) -> str:
        def repl(m: re.Match) -> str:
            raw = m.group(0)
            if valid is not None and not valid(re.sub(r"[ -]", "", raw)):
                return raw
            if counts is not None:
                counts[tag] += 1
            return f"[{tag}]"
        return pattern.sub(repl, text)

    text = sub(EMAIL, "EMAIL", text)
    text = sub(CN_ID, "ID", text, _cn_id_valid)
    text = sub(CARD, "CARD", text, _luhn)
    text = sub(CN_MOBILE, "PHONE", text)
    text = sub(PHONE, "PHONE", text)
    text = sub(IPV4, "IP", text)
    return sub(IPV6, "IP", text)


def redact_messages(messages: list[dict], counts: Counter | None = None) -> list[dict]:
    """Chat messages with every ``content`` redacted (other fields unchanged)."""
    return [{**m, "content": redact(m["content"], counts)} if isinstance(m.get("content"), str) else m
            for m in messages]
