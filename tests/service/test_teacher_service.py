"""The teacher scoring service for real: vLLM CPU engine under Ray Serve, the guard, the binary body.

One application for the module (an engine start is ~1 minute on 2 cores). Its top-k must be what
vLLM itself returns as prompt log-probs for the same ids: the reference is a direct ``vllm.LLM``
with the same engine arguments, in a subprocess (vLLM spawns processes and wants a main guard).
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import httpx
import numpy as np
import pytest

from cluster.ports import free_port
from rayjobs.serve import local_ray_env
from service.score_client import TeacherClient, TeacherServiceError
from service.score_codec import SCORE_PATH, bytes_per_token, from_flat_prompt_logprobs

pytestmark = pytest.mark.slow

# As `raystill teacher serve` would for its own Ray (see test_serving_integration).
os.environ.update(local_ray_env())

KEY = "teacher-key-9"
TOP_K = 5
ENGINE = {"dtype": "float32"}  # exact comparison: no bf16 ties between the two engines


def _sequences(world, n=12):
    """Chat-rendered prompts of the demo task plus an answer, in the teacher's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world.teacher))
    rows = [json.loads(line) for line in open(world.train_jsonl)][:n]
    seqs, lens = [], []
    for r in rows:
        prompt = tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        seqs.append(p_ids + tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        lens.append(len(p_ids))
    return seqs, lens


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory, world_config):
    from ray import serve

    from rayjobs import teacher as teacher_job

    tmp = tmp_path_factory.mktemp("teacher")
    (tmp / "api-key").write_text(KEY + "\n")
    cfg = world_config("teacher-test", tmp, teacher_service={
        "port": free_port(), "api_key_file": str(tmp / "api-key"), "api_key_env": None, "max_model_len": 128,
        "engine_kwargs": ENGINE, "limits": {"max_top_k": 8, "max_sequences": 64},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}})
    started = time.monotonic()
    url = teacher_job.run(cfg, log=print, block=False)
    print(f"teacher service ready in {time.monotonic() - started:.0f} s at {url}")
    yield {"url": url, "cfg": cfg}
    serve.shutdown()  # not only the app: the next module starts Serve on its own port


def _direct(model: str, engine: dict, seqs, k: int):
    """vLLM's own prompt log-probs for the same ids, from an engine built with the same arguments."""
    script = textwrap.dedent(f"""
        import json, sys
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        if __name__ == "__main__":
            llm = LLM(model={model!r}, **json.loads(sys.argv[1]))
            seqs = json.loads(sys.argv[2])
            params = SamplingParams(max_tokens=1, prompt_logprobs={k}, detokenize=False, flat_logprobs=True)
            outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
            flat = [o.prompt_logprobs for o in outs]
            print("RESULT " + json.dumps([[f.start_indices, f.end_indices, f.token_ids, f.logprobs] for f in flat]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(engine), json.dumps(seqs)],
                          capture_output=True, text=True, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(line[0][len("RESULT "):])


def test_topk_equals_a_direct_vllm_prompt_logprobs_call(service, tiny_world):
    from service.llm_config import engine_kwargs, kv_cache_size

    seqs, lens = _sequences(tiny_world)
    client = TeacherClient(service["url"], KEY, retries=0)
    client.score(seqs[:2], lens[:2], TOP_K)  # first request warms the engine up
    got = client.score(seqs, lens, TOP_K, dtype="float32")
    half = client.score(seqs, lens, TOP_K)  # float16 body: same ids, log-probs to half precision
    started = time.perf_counter()
    client.score(seqs * 5, lens * 5, TOP_K)  # throughput: prefix caching is off, repeats cost in full
    elapsed = time.perf_counter() - started
    scored = 5 * sum(len(s) - n for s, n in zip(seqs, lens, strict=True))
    print(f"scored {scored} tokens ({5 * sum(map(len, seqs))} prefilled) in {elapsed:.3f} s: "
          f"{scored / elapsed:.0f} scored tokens/s, top-{TOP_K}, {bytes_per_token(TOP_K)} bytes/token float16, "
          f"{bytes_per_token(TOP_K, 'float32')} float32")

    t = service["cfg"].teacher_service
    engine = engine_kwargs(t, kv_cache_size(t, str(tiny_world.teacher)).bytes)
    ref = _direct(str(tiny_world.teacher), engine, seqs, TOP_K)
    for (starts, ends, ids, lps), n, g, h in zip(ref, lens, got, half, strict=True):
        want = from_flat_prompt_logprobs(starts, ends, ids, lps, n, TOP_K)
        assert np.array_equal(g.topk_ids, want.topk_ids)
        np.testing.assert_allclose(g.topk_logprobs, want.topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(g.token_logprob, want.token_logprob, atol=1e-5)
        assert np.array_equal(h.topk_ids, want.topk_ids)
        np.testing.assert_allclose(h.topk_logprobs, want.topk_logprobs, atol=1e-2, rtol=1e-3)
    # The given token's log-prob is never above the best one, and each top-k is sorted.
    for g in got:
        assert np.all(g.token_logprob <= g.topk_logprobs[:, 0] + 1e-6)
        assert np.all(np.diff(g.topk_logprobs, axis=1) <= 1e-6)


def test_same_auth_and_typed_limits_as_the_student_endpoint(service):
    url = service["url"] + SCORE_PATH
    body = {"sequences": [[1, 2, 3]], "prompt_lens": [1], "top_k": 2}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, json={**body, "top_k": 9}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    r = httpx.post(url, json={**body, "prompt_lens": [1.0]}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_lens"
    # vLLM's own check: an id past the vocabulary is the request's fault, not the server's.
    r = httpx.post(url, json={**body, "sequences": [[1, 2, 10**6]]}, headers=auth)
    assert r.status_code == 400, r.text
    assert httpx.post(service["url"] + "/v1/chat/completions", json={}, headers=auth).status_code == 404
    assert httpx.get(service["url"] + "/health").status_code == 200
    with pytest.raises(TeacherServiceError, match="400"):
        TeacherClient(service["url"], KEY).score([[1, 2]], [2], 2)
