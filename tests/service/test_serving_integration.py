"""The real Serve app (vLLM CPU engine, guard, LoRA, autoscaling) driven with the openai client.

One app for the whole module (an engine start is ~1 minute on 2 cores); the autoscaling and
overload tests run last because they change the replica count. Every load loop is bounded
in requests and seconds.
"""

import asyncio
import json
import os
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from cluster.ports import free_port
from datasets_pipeline.config import InputConfig
from datasets_pipeline.prompts import to_prompt
from rayjobs.serve import APP_NAME, local_ray_env

pytestmark = pytest.mark.slow

# Serve's proxy mode and the workers' priority are fixed when Ray starts, and the session's
# Ray may be started by another module's fixture: set them now, at collection, as
# `raystill serve` would for its own Ray.
os.environ.update(local_ray_env())

KEY = "test-key-123"
MODEL = "raystill-student"
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "max_ongoing_requests": 4,
               "max_queued_requests": 8, "upscale_delay_s": 2, "downscale_delay_s": 5, "look_back_period_s": 2}
LIMITS = {"max_tokens": 64, "max_prompt_chars": 2000, "max_body_bytes": 16384}
Q = [{"role": "user", "content": "What is 12 + 34?"}]


def _adapter(student: str, out: str) -> str:
    """A rank-4 LoRA on q/v with random (not zero) B, so it visibly changes the output."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def app(tiny_world, ray_local, s3_server, tmp_path_factory, world_config):
    from ray import serve

    from rayjobs import serve as serve_job
    from service.app import deployment_name

    tmp = tmp_path_factory.mktemp("serving")
    adapter = _adapter(str(tiny_world.student), str(tmp / "adapter"))
    s3_server.create_bucket(Bucket="serving")
    for f in os.listdir(adapter):
        s3_server.upload_file(os.path.join(adapter, f), "serving", f"adapters/remote/{f}")
    # cluster.storage.localize cannot copy an s3:// directory without subfolders (pyarrow does
    # not create the destination); until that is fixed the s3:// adapter is left out.
    from cluster.storage import localize

    try:
        localize("s3://serving/adapters/remote", cache_root=str(tmp / "probe"))
        remote_error = None
    except OSError as e:
        remote_error = f"cluster.storage.localize fails on a flat s3:// directory: {e}"
    adapters = {"adapter": adapter} if remote_error else {"adapter": adapter, "remote": "s3://serving/adapters/remote"}
    (tmp / "api-key").write_text(KEY + "\n")
    cfg = world_config("serve-test", tmp, serving={
        "model": str(tiny_world.student), "port": free_port(),
        "api_key_file": str(tmp / "api-key"), "api_key_env": None,
        "adapters": adapters,
        "limits": LIMITS, "autoscaling": AUTOSCALING,
        "request_log": {"enabled": True, "path": "s3://serving/served", "include_completions": True,
                        "flush_interval_s": 1},
    })
    started = time.monotonic()
    url = serve_job.run(cfg, log=print, block=False)
    print(f"app ready in {time.monotonic() - started:.0f} s at {url}")
    yield {"url": url, "deployment": deployment_name(cfg.serving), "s3": s3_server, "remote_error": remote_error}
    serve.shutdown()  # not only the app: the next module starts Serve on its own port


@pytest.fixture(scope="module")
def client(app):
    return OpenAI(base_url=app["url"], api_key=KEY, max_retries=0, timeout=60)


def _replicas(app) -> dict[str, int]:
    from ray import serve

    states = serve.status().applications[APP_NAME].deployments[app["deployment"]].replica_states
    return {str(getattr(k, "value", k)): v for k, v in states.items()}


def _chat(client, model=MODEL, **kw):
    return client.chat.completions.create(model=model, messages=Q, max_tokens=8, temperature=0, **kw)


def test_models_list_has_base_and_adapters(app, client):
    ids = {m.id for m in client.models.list().data}
    assert {MODEL, f"{MODEL}:adapter"} <= ids
    assert app["remote_error"] or f"{MODEL}:remote" in ids


def test_chat_and_streaming_agree(client):
    full = _chat(client)
    assert full.model == MODEL and full.usage.completion_tokens <= 8
    chunks = [c for c in _chat(client, stream=True) if c.choices]
    # vLLM merges tokens into one chunk when they are ready before the client reads them,
    # so the count of chunks depends on timing; the text and the ending do not.
    assert len(chunks) >= 2 and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_completions_endpoint(client):
    r = client.completions.create(model=MODEL, prompt="12 + 34 =", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 5 and isinstance(r.choices[0].text, str)


def _logprobs(client, model):
    r = _chat(client, model=model, logprobs=True)
    return [t.logprob for t in r.choices[0].logprobs.content]


def test_lora_adapters_local_and_s3(app, client):
    """The adapter changes the distribution (an untrained tiny model may still pick the same tokens)."""
    base = _logprobs(client, MODEL)
    local = _logprobs(client, f"{MODEL}:adapter")
    assert max(abs(a - b) for a, b in zip(base, local)) > 1e-3
    assert _chat(client, model=f"{MODEL}:adapter").model == f"{MODEL}:adapter"
    if app["remote_error"]:
        pytest.xfail(app["remote_error"])
    remote = _logprobs(client, f"{MODEL}:remote")
    assert remote == pytest.approx(local, abs=1e-3)  # the same weights, fetched from s3


def test_auth(app):
    for key in ("wrong-key", ""):
        with pytest.raises(openai.AuthenticationError) as e:
            OpenAI(base_url=app["url"], api_key=key or "x", max_retries=0,
                   default_headers={} if key else {"Authorization": ""}).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] in ("invalid_api_key", "missing_api_key")
    assert httpx.get(app["url"].removesuffix("/v1") + "/health").status_code == 200  # probes need no key


@pytest.mark.parametrize("kw, param", [
    ({"max_tokens": 65}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "9" * 2001}]}, "messages"),
    ({"seed": 7}, "seed"),
])
def test_limits_are_400_with_openai_error_bodies(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": MODEL, "messages": Q, **kw})
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert set(e.value.body) >= {"message", "type", "param", "code"}


def test_malformed_requests_then_server_still_fine(app, client):
    url, auth = app["url"], {"Authorization": f"Bearer {KEY}"}
    big = httpx.post(f"{url}/chat/completions", headers=auth,
                     json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 20000}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad_json = httpx.post(f"{url}/chat/completions", headers={**auth, "Content-Type": "application/json"},
                          content=b'{"model": ')
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    bad_shape = httpx.post(f"{url}/chat/completions", headers=auth, json={"model": MODEL, "messages": "hi"})
    assert 400 <= bad_shape.status_code < 500 and "error" in bad_shape.json()
    with pytest.raises(openai.NotFoundError):
        _chat(client, model="no-such-model")
    assert _chat(client).choices[0].finish_reason in ("stop", "length")


def test_request_log_rows_feed_the_generation_stage(app, client):
    marker = f"What is 77 + {time.time_ns() % 1000}?"
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker}], max_tokens=4)
    s3, rows, deadline = app["s3"], [], time.monotonic() + 20
    while time.monotonic() < deadline and not rows:
        time.sleep(1)
        for obj in s3.list_objects_v2(Bucket="serving", Prefix="served/").get("Contents", []):
            body = s3.get_object(Bucket="serving", Key=obj["Key"])["Body"].read().decode()
            rows += [r for r in map(json.loads, body.splitlines()) if r["messages"][-1]["content"] == marker]
    assert len(rows) == 1, "the request was not logged within 20 s"
    prompt = to_prompt(rows[0], InputConfig(path="served.jsonl"))
    assert prompt.messages == [{"role": "user", "content": marker}] and "completion" in rows[0]


def _wait_replicas(app, want, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = _replicas(app)
        if states.get("RUNNING", 0) == want and sum(states.values()) == want:
            return True
        time.sleep(1)
    return False


def test_autoscaling_up_under_load_and_back_down(app):
    assert _wait_replicas(app, 1, 120), f"not at 1 replica before the load: {_replicas(app)}"
    stop, sent, errors = threading.Event(), [0], []

    def worker():
        c = OpenAI(base_url=app["url"], api_key=KEY, max_retries=0, timeout=60)
        while not stop.is_set() and sent[0] < 3000:
            sent[0] += 1
            try:
                c.chat.completions.create(model=MODEL, messages=Q, max_tokens=64, temperature=0,
                                          extra_body={"ignore_eos": True})
            except openai.APIError as e:
                errors.append(e)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    peak, deadline = 1, time.monotonic() + 240
    try:
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, _replicas(app).get("RUNNING", 0))
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    print(f"peak {peak} running replicas after {sent[0]} requests, {len(errors)} errors")
    assert peak >= 2, f"did not scale out within 240 s: {_replicas(app)}"
    assert _wait_replicas(app, 1, 150), f"did not scale back to 1: {_replicas(app)}"


def test_overload_is_refused_fast_in_json_with_retry_after_and_recovers(app, client):
    """#17 item 4: Serve's own full-queue 503 was plain text ("Request dropped due to backpressure");
    now every refusal is the guard's OpenAI-style JSON 503 with Retry-After, and no body holds internals."""
    assert _wait_replicas(app, 1, 120)
    burst = 48  # > max_ongoing (4) + max_queued (8) per replica, even at 2 replicas
    body = {"model": MODEL, "messages": Q, "max_tokens": 64, "temperature": 0, "ignore_eos": True}

    async def one(c):
        t = time.monotonic()
        r = await c.post("/chat/completions", json=body)
        return r, time.monotonic() - t

    async def go():
        async with httpx.AsyncClient(base_url=app["url"], headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120, limits=httpx.Limits(max_connections=burst)) as c:
            return await asyncio.gather(*(one(c) for _ in range(burst)))

    results = asyncio.run(go())
    statuses = sorted(r.status_code for r, _ in results)
    assert set(statuses) <= {200, 503}, statuses
    refused = [(r, dt) for r, dt in results if r.status_code == 503]
    assert len(refused) >= burst - 2 * (AUTOSCALING["max_ongoing_requests"] + AUTOSCALING["max_queued_requests"])
    print(f"{burst} at once: {statuses.count(200)} answered, {len(refused)} refused")
    for r, _ in refused:
        assert r.headers["content-type"] == "application/json", (r.headers, r.text[:300])
        err = r.json()["error"]
        assert r.headers.get("retry-after") == "1", r.headers
        assert err["type"] == "server_error" and err["code"] == "server_overloaded" and err["message"]
        assert not any(s in r.text for s in ("Traceback", "Exception", "backpressure", "File \"")), r.text[:300]
    assert max(dt for _, dt in refused) < 5.0, f"refusals were slow: {sorted(dt for _, dt in refused)[-3:]}"
    assert _chat(client).choices[0].finish_reason in ("stop", "length")
