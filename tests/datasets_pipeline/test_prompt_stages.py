"""InputRejects and PromptStage: a prompt the chat template refuses is a counted reject, and
``preprocess.redact_pii`` redacts inputs before prompts are rendered (#17 item 5)."""

import json

import pytest

from datasets_pipeline import records as R
from datasets_pipeline import stages
from datasets_pipeline.config import GenerationConfig


class StrictTemplate:
    """Like Llama-2/Mistral templates: roles must alternate user/assistant after an optional system."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        from jinja2.exceptions import TemplateError

        turns = messages[1:] if messages[0]["role"] == "system" else messages
        if any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)):
            raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


@pytest.fixture
def strict_teacher(monkeypatch):
    monkeypatch.setattr(stages, "_load_tokenizer", lambda path: StrictTemplate())


def _cfg(**preprocess) -> dict:
    return GenerationConfig(teacher="t", input={"path": "in.jsonl"}, output="out",
                            preprocess=preprocess).model_dump(mode="json")


def _row(messages, source="log.jsonl:1") -> dict:
    return {"source": source, "raw": json.dumps({"id": "r1", "messages": messages}).encode(), "error": None}


BAD_ORDER = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}, {"role": "user", "content": "2+2?"}]


def test_a_prompt_the_template_refuses_is_a_chat_template_reject(strict_teacher):
    """Before, PromptStage raised the template's error and the whole run (and every resume) died."""
    rejects = stages.InputRejects(_cfg(), "teacher")(_row(BAD_ORDER))
    assert [(r["stage"], r["reason"]) for r in rejects] == [("prompt", R.CHAT_TEMPLATE)]
    assert "roles must alternate" in rejects[0]["detail"]
    assert stages.PromptStage(_cfg(), "teacher")(_row(BAD_ORDER)) == []
    good = [{"role": "user", "content": "2+2?"}]
    assert stages.InputRejects(_cfg(), "teacher")(_row(good)) == []
    assert len(stages.PromptStage(_cfg(), "teacher")(_row(good))) == 1


def test_chat_template_rejects_are_counted_by_reason(tmp_path):
    from datasets_pipeline.generate import ShardWriter
    from datasets_pipeline.shards import ShardStore

    store = ShardStore(str(tmp_path), "abc")
    writer = ShardWriter(store, store.load_progress(), shard_rows=10)
    writer.add_input_reject({"source": "log.jsonl:1", "stage": "prompt", "reason": R.CHAT_TEMPLATE, "detail": "x"})
    writer.flush()
    assert writer.totals[R.CHAT_TEMPLATE] == 1 and store.load_progress().done == {"log.jsonl:1"}


def test_redact_pii_applies_to_prompts_and_reject_details(strict_teacher):
    pii = "mail me at ann@example.com or call 13812345678"
    row = _row([{"role": "user", "content": pii}])
    (request,) = stages.PromptStage(_cfg(redact_pii=True), "teacher")(row)
    assert "ann@example.com" not in request["prompt"] + request["messages"]
    assert "[EMAIL]" in request["prompt"] and "[PHONE]" in json.loads(request["messages"])[0]["content"]
    (kept,) = stages.PromptStage(_cfg(), "teacher")(row)
    assert "ann@example.com" in kept["prompt"]  # off by default
    refused = _row([{"role": "user", "content": pii}, {"role": "tool", "content": "x"}, {"role": "user", "content": "?"}])
    (reject,) = stages.InputRejects(_cfg(redact_pii=True), "teacher")(refused)
    assert "ann@example.com" not in reject["detail"] and "[EMAIL]" in reject["detail"]
