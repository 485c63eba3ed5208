import json

import pytest

from datasets_pipeline.config import InputConfig
from datasets_pipeline.prompts import Rejected, parse_json_line, split_of, to_prompt

CFG = InputConfig(path="x.jsonl", messages_field="messages", prompt_field="prompt", system_field="system",
                  answer_field="answer", max_prompt_chars=50)


def test_messages_row():
    p = to_prompt({"id": 7, "messages": [{"role": "user", "content": "1+1?"}], "answer": 2}, CFG)
    assert p.prompt_id == "7" and p.reference == "2" and p.messages[-1]["content"] == "1+1?"


def test_plain_prompt_with_system_and_content_hash_id():
    p = to_prompt({"prompt": "hi", "system": "be brief"}, CFG)
    assert [m["role"] for m in p.messages] == ["system", "user"]
    assert p.prompt_id == to_prompt({"prompt": "hi", "system": "be brief"}, CFG).prompt_id
    assert p.reference is None


@pytest.mark.parametrize("line, reason", [
    (b"{not json", "bad JSON"),
    (b"[1, 2]", "expected an object"),
    (b'{"prompt": "caf\xff"}', "invalid UTF-8"),
])
def test_unparseable_lines(line, reason):
    with pytest.raises(Rejected, match=reason):
        parse_json_line(line)


@pytest.mark.parametrize("row, reason", [
    ({"other": 1}, "missing field"),
    ({"prompt": "   "}, "empty prompt"),
    ({"prompt": "x" * 51}, "prompt too long"),
    ({"prompt": 3}, "must be a string"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, "needs string 'role' and 'content'"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "last message must be from the user"),
])
def test_invalid_rows(row, reason):
    with pytest.raises(Rejected, match=reason):
        to_prompt(row, CFG)


def test_messages_as_json_string():
    msgs = json.dumps([{"role": "user", "content": "q"}])
    assert to_prompt({"messages": msgs}, CFG).messages == [{"role": "user", "content": "q"}]


def test_split_is_deterministic_and_roughly_proportional():
    ids = [f"p{i}" for i in range(2000)]
    val = [i for i in ids if split_of(i, 0.1) == "val"]
    assert 120 < len(val) < 280
    assert val == [i for i in ids if split_of(i, 0.1) == "val"]
    assert all(split_of(i, 0.0) == "train" for i in ids[:50])
