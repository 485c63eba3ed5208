"""Turn one raw input row into a validated prompt, or a reason it was rejected.

Pure functions: the Ray stage calls them per row, tests call them directly.
A row's ``prompt_id`` is its id field when present, else a hash of its content,
so the same row gets the same id on every run (resume depends on it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from datasets_pipeline import records as R
from datasets_pipeline.config import InputConfig


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    messages: list[dict]  # [{"role": ..., "content": ...}], system first when given
    reference: str | None


class Rejected(ValueError):
    """A row that cannot become a prompt; the message is the reason recorded."""


class NoResponse(Rejected):
    """A row whose supplied response is missing or empty (``input.response_field``).

    ``reason`` is the counted name (``records.MISSING_RESPONSE`` or ``EMPTY_RESPONSE``), so these
    show in the manifest apart from malformed prompts; the message says what was found.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def parse_json_line(line: bytes) -> dict:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected(f"invalid UTF-8 at byte {e.start}") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise Rejected(f"bad JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(row, dict):
        raise Rejected(f"bad JSON: expected an object, got {type(row).__name__}")
    return row


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise Rejected("messages is a string but not JSON") from None
    if not isinstance(messages, list) or not messages:
        raise Rejected("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise Rejected(f"messages[{i}] needs string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise Rejected("last message must be from the user")
    return out


def to_prompt(row: dict, cfg: InputConfig) -> Prompt:
    """Validate a raw row against the column mapping; raise Rejected with the reason."""
    if cfg.messages_field and row.get(cfg.messages_field) is not None:
        messages = _check_messages(row[cfg.messages_field])
    elif cfg.prompt_field and row.get(cfg.prompt_field) is not None:
        text = row[cfg.prompt_field]
        if not isinstance(text, str):
            raise Rejected(f"field '{cfg.prompt_field}' must be a string")
        messages = [{"role": "user", "content": text}]
    else:
        wanted = " or ".join(f"'{f}'" for f in (cfg.messages_field, cfg.prompt_field) if f)
        raise Rejected(f"missing field {wanted}")
    if cfg.system_field and isinstance(row.get(cfg.system_field), str) and row[cfg.system_field].strip():
        messages = [{"role": "system", "content": row[cfg.system_field]}] + [
            m for m in messages if m["role"] != "system"
        ]
    size = sum(len(m["content"]) for m in messages)
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise Rejected("empty prompt")
    if size > cfg.max_prompt_chars:
        raise Rejected(f"prompt too long: {size} chars > max_prompt_chars {cfg.max_prompt_chars}")
    reference = row.get(cfg.answer_field) if cfg.answer_field else None
    reference = None if reference is None else str(reference)
    raw_id = row.get(cfg.id_field) if cfg.id_field else None
    prompt_id = str(raw_id) if raw_id not in (None, "") else _hash(messages)
    return Prompt(prompt_id=prompt_id, messages=messages, reference=reference)


def to_response(row: dict, cfg: InputConfig) -> str:
    """The row's supplied teacher response (``cfg.response_field``), or ``NoResponse`` saying why not."""
    field = cfg.response_field
    value = row.get(field)
    if value is None:
        raise NoResponse(R.MISSING_RESPONSE, f"missing field '{field}'")
    if not isinstance(value, str):
        raise NoResponse(R.MISSING_RESPONSE, f"field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise NoResponse(R.EMPTY_RESPONSE, f"field '{field}' is empty")
    return value


def split_of(prompt_id: str, val_fraction: float, seed: int = 0) -> str:
    """Deterministic train/val assignment: every sample of a prompt lands on the same side."""
    bucket = int(hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def preview(row, limit: int = 300) -> str:
    text = row.decode("utf-8", "replace") if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
