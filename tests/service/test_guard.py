"""The guard on its own: auth, limits, request-log rows, and the ASGI middleware driven by hand."""

import asyncio
import dataclasses
import json

import pytest

from datasets_pipeline.config import InputConfig
from datasets_pipeline.prompts import to_prompt
from service.guard import (
    GuardMiddleware,
    GuardPolicy,
    RequestLog,
    check_auth,
    completion_text,
    load_api_key,
    log_row,
)
from service.limits import CHAT_PATH, COMPLETIONS_PATH, GuardError, check_body

POLICY = GuardPolicy(api_key="k3y", max_tokens=64, max_prompt_chars=100, max_body_bytes=2048, reject_seed=True)


def _chat(content="What is 2+2?", **kw):
    return {"model": "m", "messages": [{"role": "user", "content": content}], **kw}


def test_api_key_file_wins_and_a_missing_file_fails_closed(tmp_path, monkeypatch):
    monkeypatch.setenv("KEY_ENV", " from-env \n")
    assert load_api_key("KEY_ENV", None) == "from-env"
    f = tmp_path / "key"
    f.write_text("from-file\n")
    assert load_api_key("KEY_ENV", str(f)) == "from-file"
    with pytest.raises(RuntimeError, match="cannot be read"):
        load_api_key("KEY_ENV", str(tmp_path / "absent"))
    (tmp_path / "empty").write_text("  ")
    with pytest.raises(RuntimeError, match="empty"):
        load_api_key(None, str(tmp_path / "empty"))
    monkeypatch.delenv("KEY_ENV")
    assert load_api_key("KEY_ENV", None) is None  # no key configured: no auth


@pytest.mark.parametrize("header, code", [
    (None, "missing_api_key"), (b"Bearer nope", "invalid_api_key"), (b"Basic k3y", "invalid_api_key"),
])
def test_auth_failures_are_401(header, code):
    headers = {} if header is None else {b"authorization": header}
    with pytest.raises(GuardError) as e:
        check_auth(headers, "k3y")
    assert (e.value.status, e.value.code) == (401, code)
    check_auth({b"authorization": b"Bearer k3y"}, "k3y")
    check_auth({}, None)


@pytest.mark.parametrize("path, body, param, code", [
    (CHAT_PATH, _chat(max_tokens=65), "max_tokens", "max_tokens_too_large"),
    (CHAT_PATH, _chat(max_completion_tokens=1000), "max_completion_tokens", "max_tokens_too_large"),
    (CHAT_PATH, _chat("x" * 101), "messages", "prompt_too_long"),
    (CHAT_PATH, _chat([{"type": "text", "text": "y" * 101}]), "messages", "prompt_too_long"),
    (COMPLETIONS_PATH, {"model": "m", "prompt": ["a" * 60, "b" * 60]}, "prompt", "prompt_too_long"),
    (CHAT_PATH, _chat(seed=1), "seed", "unsupported_parameter"),
])
def test_limits_answer_400_with_the_offending_param(path, body, param, code):
    with pytest.raises(GuardError) as e:
        check_body(path, body, POLICY)
    err = e.value
    assert (err.status, err.param, err.code) == (400, param, code)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_max_tokens_cap_is_filled_in_only_where_needed():
    assert check_body(CHAT_PATH, _chat(), POLICY)["max_tokens"] == 64
    ok = _chat(max_tokens=8)
    assert check_body(CHAT_PATH, ok, POLICY) is ok
    assert "max_tokens" not in check_body(COMPLETIONS_PATH, {"prompt": "1+1="}, POLICY)  # OpenAI default 16 fits
    tight = GuardPolicy(None, 4, 100, 2048, False)
    assert check_body(COMPLETIONS_PATH, {"prompt": "1+1="}, tight)["max_tokens"] == 4
    assert check_body(CHAT_PATH, _chat(seed=3), tight)["seed"] == 3  # GPU: seeds are fine


def test_log_rows_are_generation_stage_input():
    row = log_row({"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "text", "text": "What is 3+4?"}]}]}, "req-1")
    assert row == {"id": "req-1", "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "What is 3+4?"}]}
    prompt = to_prompt(row, InputConfig(path="x.jsonl"))
    assert prompt.prompt_id == "req-1" and prompt.messages == row["messages"]
    assert log_row({"messages": [{"role": "assistant", "content": "hi"}]}, "r") is None


def test_completion_text_from_json_and_sse():
    body = json.dumps({"choices": [{"message": {"content": "7"}}]}).encode()
    assert completion_text([body[:5], body[5:]], streamed=False) == "7"
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
              {"choices": [{"index": 0, "delta": {"content": "4"}}, {"index": 1, "delta": {"content": "x"}}]},
              {"choices": [{"index": 0, "delta": {"content": "2"}}]}]
    sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    assert completion_text([sse[:17], sse[17:]], streamed=True) == "42"
    assert completion_text([b"not json"], streamed=False) is None


def test_local_request_log_appends_jsonl(tmp_path):
    async def go():
        log = RequestLog(str(tmp_path / "log"), batch_rows=2, flush_interval_s=60)
        for i in range(3):
            log.add({"id": f"r{i}", "messages": [{"role": "user", "content": "hi"}]})
        await asyncio.sleep(0.2)  # the full batch is written in the background
        await log.close()  # the partial one on close

    asyncio.run(go())
    files = list((tmp_path / "log").glob("*.jsonl"))
    assert len(files) == 1
    assert [json.loads(x)["id"] for x in files[0].read_text().splitlines()] == ["r0", "r1", "r2"]


def test_s3_request_log_writes_one_object_per_batch(s3_server):
    s3_server.create_bucket(Bucket="reqlog")
    log = RequestLog("s3://reqlog/served", batch_rows=100, flush_interval_s=60)
    log._rows = [{"id": "a", "messages": []}, {"id": "b", "messages": []}]
    assert log.flush() == 2
    log._rows = [{"id": "c", "messages": []}]
    assert log.flush() == 1 and log.flush() == 0
    keys = sorted(o["Key"] for o in s3_server.list_objects_v2(Bucket="reqlog")["Contents"])
    assert len(keys) == 2 and all(k.startswith("served/requests-") and k.endswith(".jsonl") for k in keys)


class _App:
    """Stands in for vLLM's app: records what reached it and answers with a fixed body."""

    def __init__(self, chunks=(b'{"choices": [{"message": {"content": "ok"}}]}',), status=200):
        self.chunks, self.seen, self.status = chunks, [], status

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.seen.append((scope, message.get("body", b"")))
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
            return
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        for i, chunk in enumerate(self.chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(self.chunks) - 1})


async def _request(mw, path, body: bytes, headers=(), method="POST", chunked=False) -> list[dict]:
    """The ASGI messages ``mw`` sends for one request."""
    sent = []
    parts = [body[i:i + 700] for i in range(0, len(body), 700)] or [b""] if chunked else [body]

    async def receive():
        if parts:
            chunk = parts.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(parts)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    hdrs = list(headers) + ([] if chunked else [(b"content-length", str(len(body)).encode())])
    scope = {"type": "http", "method": method, "path": path, "headers": hdrs}
    await mw(scope, receive, send)
    return sent


def _call(mw, path, body: bytes, headers=(), method="POST", chunked=False):
    sent = asyncio.run(_request(mw, path, body, headers, method, chunked))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


AUTH = [(b"authorization", b"Bearer k3y")]


def test_middleware_refuses_before_the_app_and_passes_the_rest():
    app = _App()
    mw = GuardMiddleware(app, policy=POLICY)
    status, body = _call(mw, CHAT_PATH, json.dumps(_chat()).encode())
    assert status == 401 and json.loads(body)["error"]["code"] == "missing_api_key"
    status, body = _call(mw, "/health", b"", method="GET")
    assert status == 200  # open path, no key
    status, body = _call(mw, CHAT_PATH, b"{nope", AUTH)
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    for chunked in (False, True):
        status, body = _call(mw, CHAT_PATH, json.dumps(_chat("z" * 3000)).encode(), AUTH, chunked=chunked)
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert len(app.seen) == 1  # only /health got through
    status, _ = _call(mw, CHAT_PATH, json.dumps(_chat()).encode(), AUTH)
    assert status == 200
    scope, forwarded = app.seen[-1]
    assert json.loads(forwarded)["max_tokens"] == 64  # the cap reached the engine
    assert dict(scope["headers"])[b"content-length"] == str(len(forwarded)).encode()


def test_middleware_logs_prompt_and_streamed_completion(tmp_path):
    events = [b'data: {"choices": [{"index": 0, "delta": {"content": "4"}}]}\n\n',
              b'data: {"choices": [{"index": 0, "delta": {"content": "2"}}]}\n\ndata: [DONE]\n\n']
    app = _App(chunks=events)
    log = RequestLog(str(tmp_path), batch_rows=10, flush_interval_s=60)
    mw = GuardMiddleware(app, policy=POLICY, request_log=log, include_completions=True)
    status, body = _call(mw, CHAT_PATH, json.dumps(_chat(stream=True)).encode(), AUTH)
    assert status == 200 and body == b"".join(events)  # stream passed through unchanged
    (row,) = log._rows
    assert row["messages"] == [{"role": "user", "content": "What is 2+2?"}] and row["completion"] == "42"


@pytest.mark.parametrize("key, value, code", [
    ("max_tokens", 65.0, "invalid_type"), ("max_tokens", "65", "invalid_type"), ("max_tokens", True, "invalid_type"),
    ("max_tokens", -1, "invalid_value"), ("max_tokens", 0, "invalid_value"),
    ("max_completion_tokens", 64.5, "invalid_type"), ("max_completion_tokens", "8", "invalid_type"),
    ("n", 2.0, "invalid_type"), ("n", 0, "invalid_value"), ("best_of", "3", "invalid_type"),
])
def test_limits_are_typed(key, value, code):
    """#17 item 2: before, only int values were compared, so 65.0, "65", true and negatives passed."""
    with pytest.raises(GuardError) as e:
        check_body(CHAT_PATH, _chat(**{key: value}), POLICY)
    assert (e.value.status, e.value.param, e.value.code) == (400, key, code)


def test_n_copies_count_against_the_token_limit():
    with pytest.raises(GuardError, match=r"max_tokens=40 x 2 completions exceeds .* 64"):
        check_body(CHAT_PATH, _chat(max_tokens=40, n=2), POLICY)
    with pytest.raises(GuardError, match=r"x 3 completions"):
        check_body(COMPLETIONS_PATH, {"prompt": "1+1=", "max_tokens": 30, "best_of": 3}, POLICY)
    assert check_body(CHAT_PATH, _chat(max_tokens=32, n=2), POLICY)["max_tokens"] == 32
    assert check_body(CHAT_PATH, _chat(n=4), POLICY)["max_tokens"] == 16  # the filled-in cap is split


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages", "/invocations", "/tokenize", "/v1/embeddings",
                                  "/metrics", "/v1/audio/transcriptions"])
def test_unlisted_routes_are_404_before_the_engine(path):
    """#17 item 1: every other route vLLM mounts reached the engine unguarded."""
    app = _App()
    status, body = _call(GuardMiddleware(app, policy=POLICY), path, json.dumps({"input": "hi"}).encode(), AUTH)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found" and not app.seen


def test_websockets_need_the_key_too():
    """#17 item 3: websocket scopes were passed through without auth."""
    app = _App()
    mw = GuardMiddleware(app, policy=POLICY)
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    for headers, admitted in (([], False), (AUTH, True)):
        sent.clear()
        scope = {"type": "websocket", "path": CHAT_PATH, "headers": headers}
        asyncio.run(mw(scope, receive, send))
        assert (sent == [{"type": "websocket.close", "code": 1008}]) is not admitted


def test_a_non_loopback_bind_without_key_is_refused():
    from service.guard import ExposedWithoutKey, check_exposure

    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "k", False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(ExposedWithoutKey, match="serving.allow_unauthenticated"):
        check_exposure("0.0.0.0", None, False)


class _Raises(_App):
    async def __call__(self, scope, receive, send):
        raise ValueError("secret internals")


@pytest.mark.parametrize("app, logged", [
    (_App(status=500, chunks=[b"Traceback ... ValueError: secret internals"]), "secret internals"),
    # #17 item 4: an app that raised before answering got Starlette's (or Serve's) plain-text 500.
    (_Raises(), "ValueError: secret internals"),
], ids=["answered-500", "raised"])
def test_engine_errors_reach_clients_without_internals(caplog, app, logged):
    """#17 item 4: a 500's body or traceback is logged under a request id, not sent."""
    status, body = _call(GuardMiddleware(app, policy=POLICY), CHAT_PATH, json.dumps(_chat()).encode(), AUTH)
    err = json.loads(body)["error"]
    assert status == 500 and err["type"] == "server_error" and "internals" not in body.decode()
    request_id = err["message"].rsplit("id ", 1)[1].rstrip(")")
    assert any(request_id in r.message and logged in r.message for r in caplog.records)


class _Slow(_App):
    """Answers chat requests only once ``release`` is set, so they pile up in flight."""

    def __init__(self):
        super().__init__()
        self.release = asyncio.Event()

    async def __call__(self, scope, receive, send):
        if scope["path"] == CHAT_PATH:
            await self.release.wait()
        await super().__call__(scope, receive, send)


def test_beyond_the_bound_a_json_503_with_retry_after_then_admitted_again():
    """#17 item 4: Serve's own full-queue 503 is plain text; the guard's bound answers first, in JSON."""
    mw = GuardMiddleware(app := _Slow(), policy=dataclasses.replace(POLICY, max_in_flight=2))
    chat = json.dumps(_chat()).encode()

    async def go():
        held = [asyncio.create_task(_request(mw, CHAT_PATH, chat, AUTH)) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await _request(mw, CHAT_PATH, chat, AUTH)
        others = [await _request(mw, p, b"", AUTH, m) for p, m in (("/health", "GET"), ("/v1/models", "GET"))]
        app.release.set()
        done = await asyncio.gather(*held)
        return refused, others, done, await _request(mw, CHAT_PATH, chat, AUTH)

    refused, others, done, after = asyncio.run(go())
    assert refused[0]["status"] == 503 and dict(refused[0]["headers"])[b"retry-after"] == b"1"
    err = json.loads(refused[1]["body"])["error"]
    assert err["code"] == "server_overloaded" and "serving.autoscaling.max_queued_requests" in err["message"]
    assert {m[0]["status"] for m in others} == {200}  # probes and model listing are never counted
    assert [m[0]["status"] for m in done] == [200, 200] and after[0]["status"] == 200
    assert mw.capacity.in_flight == 0


@pytest.mark.parametrize("messages", [
    [{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}, {"role": "user", "content": "b"}],
    [{"role": "developer", "content": "x"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "  "}],
])
def test_request_log_keeps_only_rows_a_chat_template_renders(messages):
    """#17 item 5: any client could log role sequences the teacher's template refuses."""
    assert log_row({"messages": messages}, "r") is None


def test_request_log_redacts_before_writing():
    row = log_row({"messages": [{"role": "user", "content": "I am a@b.io, 13812345678"}]}, "r", redact_pii=True)
    assert row["messages"][0]["content"] == "I am [EMAIL], [PHONE]"


def test_request_log_buffer_is_bounded_while_storage_is_down(tmp_path, caplog):
    """#17 item 5: a failed write kept every row for the next try, without limit."""
    log = RequestLog(str(tmp_path / "log"), batch_rows=1000, flush_interval_s=60, max_buffered_rows=5)
    log._fs = None  # storage down: every write raises
    for i in range(4):
        log._rows.append({"id": i})
    assert log.flush() == 0 and len(log._rows) == 4  # kept for the next try
    log._rows += [{"id": i} for i in range(4, 8)]
    assert log.flush() == 0
    assert [r["id"] for r in log._rows] == [3, 4, 5, 6, 7] and log.dropped == 3  # the oldest went
    assert "dropped the 3 oldest rows" in caplog.text
