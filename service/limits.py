"""Which routes are served and what a generation request may ask for (#17: typed limits).

Pure: the standard library only. Every refusal is a ``GuardError`` carrying an OpenAI-style body
(``{"error": {"message", "type", "param", "code"}}``), which the ``openai`` client turns into the
matching exception. Token limits are checked by type, not only by size: ``65.0``, ``"65"``,
``true`` and negatives are refused, and ``n``/``best_of`` copies count against the limit.
"""

from __future__ import annotations

import json
from typing import Any

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
GENERATE_PATHS = (CHAT_PATH, COMPLETIONS_PATH)
# Load balancers and Kubernetes probes call this without a key.
OPEN_PATHS = ("/health",)
# Everything else vLLM mounts (/v1/responses, /v1/messages, /invocations, /tokenize, ...) is 404:
# only these routes are documented, guarded and request-logged.
ALLOWED_PATHS = (*GENERATE_PATHS, "/v1/models", *OPEN_PATHS)
# vLLM CPU (0.32) cannot rewind a seeded request's CPU generator when its prefill is split
# across steps (long prompt or busy batch): the step raises "CPU Generator does not use
# offset" and the engine dies with every request in flight. Refuse seeds up front.
SEED_ON_CPU = ("per-request 'seed' is not supported on the CPU engine (vLLM CPU crashes with "
               "'CPU Generator does not use offset' when a seeded prompt is prefilled in chunks); remove it")
# OpenAI's default for /v1/completions; chat has none, so the guard supplies one.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

class GuardError(Exception):
    """A refused request: HTTP status plus the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str = "invalid_request_error", retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type
        self.retry_after_s = retry_after_s  # sent as Retry-After (whole seconds, RFC 9110)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_route(path: str) -> None:
    if path not in ALLOWED_PATHS:
        raise GuardError(404, f"no route {path}; this server serves {', '.join(ALLOWED_PATHS)}", code="not_found")


def text(content) -> str:
    """Message content as text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_chars(path: str, body: dict) -> int:
    """Prompt size in characters (token-id prompts count one per id)."""
    if path == CHAT_PATH:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        return sum(len(text(m.get("content"))) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(len(p) if isinstance(p, (str, list)) else 1 for p in prompt)
    return 0


def check_body(path: str, body: Any, policy: GuardPolicy) -> dict:
    """Validate a generation request against the limits; return it (with a max_tokens cap filled in).

    Shape errors beyond what the limits need are left to vLLM, which answers them itself.
    """
    if not isinstance(body, dict):
        raise GuardError(400, "request body must be a JSON object", code="invalid_json")
    keys = ("max_completion_tokens", "max_tokens") if path == CHAT_PATH else ("max_tokens",)
    copies = max(_int_param(body, "n") or 1, _int_param(body, "best_of") or 1)
    for key in keys:
        value = _int_param(body, key)
        if value is not None and value * copies > policy.max_tokens:
            times = f" x {copies} completions" if copies > 1 else ""
            raise GuardError(400, f"{key}={value}{times} exceeds this server's limit of {policy.max_tokens} tokens",
                             code="max_tokens_too_large", param=key)
    chars = prompt_chars(path, body)
    if chars > policy.max_prompt_chars:
        param = "messages" if path == CHAT_PATH else "prompt"
        raise GuardError(400, f"prompt is {chars} characters, over this server's limit of {policy.max_prompt_chars}",
                         code="prompt_too_long", param=param)
    if policy.reject_seed and body.get("seed") is not None:
        raise GuardError(400, SEED_ON_CPU, code="unsupported_parameter", param="seed")
    if all(body.get(k) is None for k in keys):
        budget = policy.max_tokens // copies
        default = budget if path == CHAT_PATH else COMPLETIONS_DEFAULT_MAX_TOKENS
        if default > budget or path == CHAT_PATH:
            body = {**body, "max_tokens": min(default, budget)}
    return body


def _int_param(body: dict, key: str) -> int | None:
    """A positive integer parameter, or None when absent; anything else is a 400."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise GuardError(400, f"{key} must be an integer, got {json.dumps(value)}", code="invalid_type", param=key)
    if value < 1:
        raise GuardError(400, f"{key} must be at least 1, got {value}", code="invalid_value", param=key)
    return value


