"""The guard in front of the engine: API key, request limits, the per-replica bound on requests in
flight (``service.errors.Capacity``: beyond it a JSON 503 with ``Retry-After``) and optional
request logging.

A plain ASGI middleware wrapped around vLLM's own OpenAI app inside the engine replica
(``service.app``), so it costs one JSON parse per request and no extra hop. Every refusal
is an OpenAI-style body, ``{"error": {"message", "type", "param", "code"}}``, which the
``openai`` client turns into the matching exception. Streaming responses pass through
untouched (only observed when completions are logged).

Pure: the standard library plus pyarrow (for the request log); no Ray, no vLLM, no Starlette.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cluster.errors import UserError
from cluster.pii import redact, redact_messages
from service.errors import Capacity, MaskedSend, send_error
from service.limits import CHAT_PATH, STUDENT_ROUTES, TEACHER_ROUTES, GuardError, Routes, check_route
from service.limits import text as message_text

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def load_api_key(env_name: str | None, file_path: str | None) -> str | None:
    """The key from the secret file, else the env var; None means no auth.

    A configured file that is missing or empty is an error, never "no auth": failing
    open because a Secret was not mounted would expose the endpoint.
    """
    if file_path:
        try:
            key = open(file_path, encoding="utf-8").read().strip()
        except OSError as e:
            raise RuntimeError(f"api_key_file {file_path!r} cannot be read: {e.strerror}") from None
        if not key:
            raise RuntimeError(f"api_key_file {file_path!r} is empty")
        return key
    key = os.environ.get(env_name, "").strip() if env_name else ""
    return key or None


@dataclass(frozen=True)
class GuardPolicy:
    api_key: str | None
    max_tokens: int
    max_prompt_chars: int
    max_body_bytes: int
    reject_seed: bool
    max_in_flight: int | None = None  # engine requests one replica holds; beyond: 503 (service.errors)
    routes: Routes = STUDENT_ROUTES
    score: Any = None  # the teacher's ScoreLimitsConfig

    @classmethod
    def from_config(cls, cfg) -> GuardPolicy:
        """From a ``ServingConfig``; reads the key, so call it where the key lives (the replica)."""
        return cls(
            api_key=load_api_key(cfg.api_key_env, cfg.api_key_file),
            max_tokens=cfg.limits.max_tokens,
            max_prompt_chars=cfg.limits.max_prompt_chars,
            max_body_bytes=cfg.limits.max_body_bytes,
            reject_seed=cfg.accelerator == "cpu",
            max_in_flight=cfg.autoscaling.max_in_flight,
        )

    @classmethod
    def for_teacher(cls, cfg) -> GuardPolicy:
        """From a ``TeacherServiceConfig``: the same key handling, the scoring route and its limits."""
        return cls(api_key=load_api_key(cfg.api_key_env, cfg.api_key_file), max_tokens=cfg.limits.max_tokens,
                   max_prompt_chars=0, max_body_bytes=cfg.limits.max_body_bytes, reject_seed=False,
                   routes=TEACHER_ROUTES, score=cfg.limits,
                   max_in_flight=cfg.autoscaling.max_in_flight)


class ExposedWithoutKey(UserError):
    """Serving beyond this machine with no API key, and nobody said that was intended."""


def check_exposure(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Auth fails closed: a non-loopback bind needs a key unless ``allow_unauthenticated`` says so."""
    loopback = host == "localhost" or host == "::1" or host.startswith("127.")
    if api_key is None and not allow_unauthenticated and not loopback:
        raise ExposedWithoutKey(
            f"serving.host is {host} (reachable from other machines) and no API key is configured "
            "(serving.api_key_env is unset or empty, no serving.api_key_file): set a key, bind to 127.0.0.1, "
            "or set serving.allow_unauthenticated: true")


def check_auth(headers: dict[bytes, bytes], api_key: str | None) -> None:
    if api_key is None:
        return
    value = headers.get(b"authorization", b"")
    scheme, _, token = value.partition(b" ")
    if not value:
        raise GuardError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), api_key.encode()):
        raise GuardError(401, "invalid API key", code="invalid_api_key")


# What a teacher's chat template accepts: an optional system turn first, then user/assistant turns
# ending with the user's. Anything else would be a row the next generation run cannot render.
LOGGED_ROLES = ("system", "user", "assistant")


def log_row(body: dict, request_id: str, redact_pii: bool = False) -> dict | None:
    """A chat request as a generation-stage input row ``{"id", "messages"}``; None if it could not be one
    (roles other than system/user/assistant, a system turn after the first, no final user turn)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in LOGGED_ROLES or (m["role"] == "system" and i > 0):
            return None
        out.append({"role": m["role"], "content": message_text(m.get("content"))})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():  # generation needs a user turn to answer
        return None
    return {"id": request_id, "messages": redact_messages(out) if redact_pii else out}


def completion_text(chunks: list[bytes], streamed: bool) -> str | None:
    """The first choice's text from a chat response body (JSON, or SSE when streamed)."""
    raw = b"".join(chunks)
    try:
        if not streamed:
            choice = json.loads(raw)["choices"][0]
            return (choice.get("message") or {}).get("content") or choice.get("text") or ""
        parts = []
        for line in raw.split(b"\n"):
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices", []):
                if choice.get("index", 0) == 0:
                    parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
        return "".join(parts)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


class RequestLog:
    """Buffered JSONL writer: local directories get one appended file per process,
    s3:// prefixes one object per batch (objects cannot be appended to).

    Objects are written straight to the filesystem, not with ``cluster.storage.write_bytes``: that
    one creates parent "directories", which on S3 are empty marker objects in the very prefix the
    generation stage reads as its input.
    """

    def __init__(self, location: str, batch_rows: int = 256, flush_interval_s: float = 30.0,
                 max_buffered_rows: int = 10_000):
        from cluster.storage import filesystem, is_s3

        self.location, self.batch_rows, self.flush_interval_s = location, batch_rows, flush_interval_s
        # While storage is down rows wait here; beyond this many the oldest go, counted in ``dropped``.
        self.max_buffered_rows, self.dropped = max_buffered_rows, 0
        self._fs, self._dir = filesystem(location)
        self._s3 = is_s3(location)
        self._stem = f"requests-{socket.gethostname()}-{os.getpid()}"
        self._rows: list[dict] = []
        self._seq = 0
        self._lock = threading.Lock()  # flushes run in worker threads
        self._task: asyncio.Task | None = None
        if not self._s3:
            self._fs.create_dir(self._dir, recursive=True)

    def add(self, row: dict) -> None:
        with self._lock:
            self._rows.append(row)
            if len(self._rows) > self.max_buffered_rows:
                self._rows = self._bounded(self._rows)
            full = len(self._rows) >= self.batch_rows
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_periodically())
        if full:
            asyncio.get_running_loop().run_in_executor(None, self.flush)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await asyncio.to_thread(self.flush)

    def flush(self) -> int:
        from cluster.storage import to_jsonl

        with self._lock:
            rows, self._rows = self._rows, []
            if not rows:
                return 0
            data = to_jsonl(rows)
            try:
                if self._s3:
                    self._seq += 1
                    name = f"{self._dir}/{self._stem}-{int(time.time())}-{self._seq:06d}.jsonl"
                    with self._fs.open_output_stream(name) as f:
                        f.write(data)
                else:
                    with self._fs.open_append_stream(f"{self._dir}/{self._stem}.jsonl") as f:
                        f.write(data)
            except Exception:  # logging must never fail a request; keep the rows for the next try
                log.exception("request log: writing %d rows to %s failed", len(rows), self.location)
                self._rows = self._bounded(rows + self._rows)
                return 0
        return len(rows)

    def _bounded(self, rows: list[dict]) -> list[dict]:
        """At most ``max_buffered_rows`` rows, the newest; what is dropped is counted and logged."""
        excess = len(rows) - self.max_buffered_rows
        if excess <= 0:
            return rows
        self.dropped += excess
        log.warning("request log: storage unavailable, dropped the %d oldest rows (%d dropped in all)",
                    excess, self.dropped)
        return rows[excess:]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.to_thread(self.flush)


def route_path(scope: Scope) -> str:
    """The path below the application's route prefix (Serve passes the prefix as ``root_path``)."""
    root = scope.get("root_path", "")
    path = scope["path"]
    return path[len(root):] or "/" if root and path.startswith(root) else path


async def _read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes | None:
    """The whole request body, at most ``limit`` bytes; None if the client went away."""
    too_big = GuardError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # chunked uploads carry no length: stop reading at the limit
            raise too_big
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


class GuardMiddleware:
    """ASGI middleware: ``app.add_middleware(GuardMiddleware, policy=..., request_log=...)``."""

    def __init__(self, app, *, policy: GuardPolicy, request_log: RequestLog | None = None,
                 include_completions: bool = False, redact_pii: bool = True):
        self.app, self.policy, self.request_log = app, policy, request_log
        self.include_completions, self.redact_pii = include_completions, redact_pii
        self.capacity = Capacity(policy.max_in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        masked = MaskedSend(send, route_path(scope))
        try:
            await self._http(scope, receive, masked)
        except GuardError as err:  # refusals go out unmasked: a 503 for overload is ours, not a failure
            await send_error(send, err)
        except Exception:
            # Without this, Starlette (or Serve, in front of it) answers a plain-text 500.
            if masked.started:
                raise
            await send_error(send, masked.failure(500, traceback.format_exc()))

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        check_route(path, self.policy.routes)
        if path in self.policy.routes.open:
            await self.app(scope, receive, send)
            return
        check_auth(dict(scope["headers"]), self.policy.api_key)
        if path not in self.policy.routes.checks:  # only the engine's routes take a slot
            await self._serve(scope, receive, send)
            return
        with self.capacity.slot():
            await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run an authenticated request past the limits, then through the app (and the request log)."""
        admitted = await self._admit(scope, receive)
        if admitted is None:  # the client went away
            return
        scope, raw, body = admitted
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        receive_body = receive if raw is None else replay
        row = None
        if self.request_log is not None and route_path(scope) == CHAT_PATH and body is not None:
            row = log_row(body, f"req-{uuid.uuid4().hex}", self.redact_pii)
        if row is None:
            await self.app(scope, receive_body, send)
        elif not self.include_completions:
            self.request_log.add(row)
            await self.app(scope, receive_body, send)
        else:
            await self._run_and_log(scope, receive_body, send, row, bool(body.get("stream")))

    async def _admit(self, scope: Scope, receive: Receive):
        """``(scope, raw body, checked body)`` of an admitted request (raw None: nothing read),
        or None if the client disconnected; raises ``GuardError`` on a refusal."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return scope, None, None
        raw = await _read_body(receive, dict(scope["headers"]), self.policy.max_body_bytes)
        if raw is None:
            return None
        check = self.policy.routes.checks.get(route_path(scope))
        if check is None:
            return scope, raw, None
        try:
            parsed = json.loads(raw)
        except ValueError as e:
            raise GuardError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        body = check(route_path(scope), parsed, self.policy)
        if body is not parsed:
            raw = json.dumps(body).encode()
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-length"]
                     + [(b"content-length", str(len(raw)).encode())]}
        return scope, raw, body

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Websockets get the same route allowlist and key as HTTP; a refusal closes before accepting."""
        try:
            check_route(route_path(scope), self.policy.routes)
            check_auth(dict(scope["headers"]), self.policy.api_key)
        except GuardError as err:
            log.info("websocket %s refused: %s", scope["path"], err.message)
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)

    async def _run_and_log(self, scope: Scope, receive: Receive, send: Send, row: dict, streamed: bool) -> None:
        status, chunks = 0, []

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, capture)
        if status == 200:
            text = completion_text(chunks, streamed)
            if text is not None:
                self.request_log.add({**row, "completion": redact(text) if self.redact_pii else text})
