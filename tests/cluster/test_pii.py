"""PII redaction (#17 item 5): what must go, and what must stay (numbers in math prompts)."""

from collections import Counter

import pytest

from cluster.pii import redact, redact_messages


@pytest.mark.parametrize("text, tag", [
    ("write to jane.doe+x@example.co.uk today", "EMAIL"),
    ("call 138 1234 5678", "PHONE"),
    ("手机13812345678联系", "PHONE"),
    ("+86 139-1234-5678", "PHONE"),
    ("(415) 555-2671", "PHONE"),
    ("+44 20 7946 0958", "PHONE"),
    ("身份证 11010519491231002X", "ID"),
    ("card 4111 1111 1111 1111 exp", "CARD"),
    ("card 5500-0000-0000-0004", "CARD"),
    ("from 192.168.1.20 ok", "IP"),
    ("v6 2001:db8:85a3::8a2e:370:7334 ok", "IP"),
])
def test_personal_data_is_replaced(text, tag):
    counts = Counter()
    out = redact(text, counts)
    assert f"[{tag}]" in out and counts[tag] == 1, out


@pytest.mark.parametrize("text", [
    "What is 4821 + 397?", "计算 4821 + 397，并给出步骤。", "12345678901234567 is not a valid id",
    "4111 1111 1111 1112 fails Luhn", "version 1.2.3", "x = 3.14159", "the year 2026",
])
def test_ordinary_numbers_stay(text):
    assert redact(text) == text


def test_messages_keep_their_roles():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "mail me: a@b.io"}]
    assert redact_messages(msgs) == [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "mail me: [EMAIL]"}]
