"""Which routes are served and what a generation request may ask for (#17: typed limits).

Pure: the standard library only. Every refusal is a ``GuardError`` carrying an OpenAI-style body
(``{"error": {"message", "type", "param", "code"}}``), which the ``openai`` client turns into the
matching exception. Token limits are checked by type, not only by size: ``65.0``, ``"65"``,
``true`` and negatives are refused, and ``n``/``best_of`` copies count against the limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.score_codec import SCORE_PATH

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


@dataclass(frozen=True)
class Routes:
    """What one endpoint serves: every allowed path, the ones open without a key, and the JSON-bodied ones
    with their typed check (``check(path, body, policy) -> body``)."""

    allowed: tuple[str, ...]
    open: tuple[str, ...] = OPEN_PATHS
    checks: dict[str, Callable[[str, Any, Any], dict]] = field(default_factory=dict)


def check_route(path: str, routes: Routes) -> None:
    if path not in routes.allowed:
        raise GuardError(404, f"no route {path}; this server serves {', '.join(routes.allowed)}", code="not_found")


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




def check_score_body(path: str, body: Any, policy) -> dict:
    """A teacher scoring request (``service.score_codec``): ``{"sequences": [[id, ...], ...],
    "prompt_lens": [n, ...], "top_k": k, "dtype": "float16" | "float32"}``, every number typed and
    within ``policy.score`` (a ``ScoreLimitsConfig``). Returned unchanged."""
    if not isinstance(body, dict):
        raise GuardError(400, "request body must be a JSON object", code="invalid_json")
    limits = policy.score
    top_k = _int_param(body, "top_k")
    if top_k is None or top_k > limits.max_top_k:
        raise GuardError(400, f"top_k must be given, at most {limits.max_top_k}", code="invalid_value", param="top_k")
    if body.get("dtype", "float16") not in ("float16", "float32"):
        raise GuardError(400, "dtype must be 'float16' or 'float32'", code="invalid_value", param="dtype")
    seqs, lens = body.get("sequences"), body.get("prompt_lens")
    if not isinstance(seqs, list) or not isinstance(lens, list) or len(seqs) != len(lens) or not seqs:
        raise GuardError(400, "sequences and prompt_lens must be non-empty lists of the same length",
                         code="invalid_type", param="sequences")
    if len(seqs) > limits.max_sequences:
        raise GuardError(400, f"{len(seqs)} sequences exceed this server's limit of {limits.max_sequences}",
                         code="too_many_sequences", param="sequences")
    total = 0
    for i, (ids, n) in enumerate(zip(seqs, lens, strict=True)):
        if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
            raise GuardError(400, f"sequences[{i}] must be a list of non-negative integer token ids",
                             code="invalid_type", param="sequences")
        if type(n) is not int or not 1 <= n < len(ids):
            raise GuardError(400, f"prompt_lens[{i}] must be an integer in [1, {len(ids) - 1}] (at least one "
                             "prompt and one continuation token)", code="invalid_value", param="prompt_lens")
        total += len(ids)
    if total > limits.max_tokens:
        raise GuardError(400, f"{total} token ids exceed this server's limit of {limits.max_tokens} per request",
                         code="max_tokens_too_large", param="sequences")
    return body


STUDENT_ROUTES = Routes(ALLOWED_PATHS, OPEN_PATHS, {CHAT_PATH: check_body, COMPLETIONS_PATH: check_body})
TEACHER_ROUTES = Routes((SCORE_PATH, *OPEN_PATHS), OPEN_PATHS, {SCORE_PATH: check_score_body})
