"""How failures leave a replica: OpenAI-style JSON with no internals (#17 item 4).

Three kinds of failure reach a client: a refusal by the guard (4xx, or the overload 503 below),
a 5xx that the engine's app answered, and an exception the app raised before answering. All
become ``{"error": {"message", "type", "param", "code"}}``; a 5xx body or a traceback is logged
under a request id that the client's message names, and never sent.

Overload lives here rather than in Serve: Serve's own full-queue 503 is plain text ("Request
dropped due to backpressure", written by the replica in HAProxy mode or by the proxy otherwise)
produced before any of our code runs, with no hook to shape it. So each replica bounds the
generation requests it holds itself (``Capacity``), and Serve is configured to admit more than
that bound and never to queue-refuse (``service.llm_config.deployment_config``).

Pure: the standard library only.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from service.limits import GuardError

log = logging.getLogger(__name__)

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]

OVERLOAD_STATUS = 503
# Whole seconds (RFC 9110 delay-seconds): the engine frees a slot within a few decode steps.
OVERLOAD_RETRY_AFTER_S = 1
BOUND_SETTING = "serving.autoscaling.max_ongoing_requests + serving.autoscaling.max_queued_requests"


async def send_error(send: Send, err: GuardError) -> None:
    """Answer with ``err`` as an OpenAI-style JSON error (plus WWW-Authenticate / Retry-After)."""
    payload = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if err.retry_after_s is not None:
        headers.append((b"retry-after", str(err.retry_after_s).encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class Capacity:
    """At most ``limit`` generation requests held by this replica (None: no bound).

    Held means from admission until the response ends: running in the engine or waiting in
    vLLM's scheduler, which runs ``max_num_seqs`` (= ``max_ongoing_requests``) at once. One
    event loop per replica serves every request, so a plain counter is exact.
    """

    def __init__(self, limit: int | None):
        self.limit, self.in_flight = limit, 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.limit is not None and self.in_flight >= self.limit:
            raise GuardError(
                OVERLOAD_STATUS,
                f"the server is at capacity ({self.in_flight} requests in progress on this replica, "
                f"the limit set by {BOUND_SETTING}); retry after {OVERLOAD_RETRY_AFTER_S} s",
                code="server_overloaded", type="server_error", retry_after_s=OVERLOAD_RETRY_AFTER_S)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class MaskedSend:
    """The ``send`` given to the engine's app: a 5xx it starts is held, its body logged under a
    request id, and the client gets a ``server_error`` naming that id instead.

    ``started`` says whether anything reached the client, i.e. whether an exception raised by
    the app can still be answered (``failure``) or only cut the connection.
    """

    def __init__(self, send: Send, path: str):
        self._send, self.path, self.started = send, path, False
        self._held: dict | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 500:
            self._held = {"status": message["status"], "body": []}
            return
        if self._held is None:
            self.started = True
            await self._send(message)
            return
        self._held["body"].append(message.get("body", b""))
        if not message.get("more_body"):
            detail = b"".join(self._held["body"]).decode("utf-8", "replace")
            self.started = True
            await send_error(self._send, self.failure(self._held["status"], detail))

    def failure(self, status: int, detail: str) -> GuardError:
        """Log ``detail`` (a 5xx body or a traceback) under a fresh id; the error the client gets."""
        request_id = f"err-{uuid.uuid4().hex[:12]}"
        log.error("%s %s answered %d: %s", request_id, self.path, status, detail[:4000])
        return GuardError(status, f"the server failed to process the request (id {request_id})",
                          code="server_error", type="server_error")
