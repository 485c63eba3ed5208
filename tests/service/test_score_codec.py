"""The scoring service's wire format and request limits: pure, milliseconds."""

import json

import numpy as np
import pytest

from service.config import TeacherServiceConfig
from service.guard import GuardPolicy
from service.limits import TEACHER_ROUTES, GuardError, check_route, check_score_body
from service.llm_config import engine_kwargs
from service.score_codec import (
    SCORE_PATH,
    CodecError,
    SequenceScores,
    bytes_per_token,
    decode_scores,
    encode_scores,
    from_flat_prompt_logprobs,
)


def _seq(rng, n, k):
    ids = rng.integers(0, 150_000, (n, k))
    lps = np.sort(-rng.random((n, k)).astype(np.float32) * 20, axis=1)[:, ::-1]
    return SequenceScores(-rng.random(n).astype(np.float32) * 30, ids, lps)


@pytest.mark.parametrize("dtype, atol", [("float16", 2e-2), ("float32", 0.0)])
def test_round_trip_and_size(dtype, atol):
    rng = np.random.default_rng(0)
    k = 20
    seqs = [_seq(rng, n, k) for n in (5, 0, 17)]
    body = encode_scores(seqs, k, dtype)
    assert len(body) == 12 + 4 * 3 + 22 * bytes_per_token(k, dtype)
    assert bytes_per_token(20) == 122 and bytes_per_token(20, "float32") == 164
    out = decode_scores(body)
    assert [len(s) for s in out] == [5, 0, 17]
    for a, b in zip(seqs, out, strict=True):
        assert np.array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(b.token_logprob, a.token_logprob, atol=atol, rtol=1e-3 if atol else 0)
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, atol=atol, rtol=1e-3 if atol else 0)


def test_minus_infinity_survives_float16():
    s = SequenceScores(np.array([-np.inf], np.float32), np.array([[3, 4]]), np.array([[-0.1, -np.inf]], np.float32))
    assert decode_scores(encode_scores([s], 2))[0].topk_logprobs[0, 1] == -np.inf


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b[:5], "shorter than"), (lambda b: b"XXXX" + b[4:], "not a version"),
    (lambda b: b[:-1], "header says"), (lambda b: b + b"\0", "header says"),
])
def test_malformed_bodies_are_refused(mutate, match):
    body = encode_scores([_seq(np.random.default_rng(1), 3, 4)], 4)
    with pytest.raises(CodecError, match=match):
        decode_scores(mutate(body))


def test_from_flat_prompt_logprobs_matches_vllm_layout():
    # vLLM's FlatLogprobs of prompt [5, 6, 7], k = 2: position 0 empty, then the given token, then the top-2.
    starts, ends = [0, 0, 3], [0, 3, 6]
    ids = [6, 9, 6, 7, 7, 1]
    lps = [-1.5, -0.5, -1.5, -2.0, -2.0, -3.0]
    s = from_flat_prompt_logprobs(starts, ends, ids, lps, prompt_len=1, k=2)
    assert s.token_logprob.tolist() == [-1.5, -2.0]
    assert s.topk_ids.tolist() == [[9, 6], [7, 1]] and s.topk_logprobs.tolist() == [[-0.5, -1.5], [-2.0, -3.0]]
    assert len(from_flat_prompt_logprobs(starts, ends, ids, lps, prompt_len=2, k=2)) == 1
    with pytest.raises(CodecError, match="1 \\+ 3"):
        from_flat_prompt_logprobs(starts, ends, ids, lps, prompt_len=1, k=3)


POLICY = GuardPolicy.for_teacher(TeacherServiceConfig(api_key_env=None, limits={
    "max_tokens": 10, "max_sequences": 2, "max_top_k": 8}))


def _req(**kw):
    return {"sequences": [[1, 2, 3]], "prompt_lens": [1], "top_k": 4, **kw}


@pytest.mark.parametrize("body, param, code", [
    (_req(top_k=9), "top_k", "invalid_value"), (_req(top_k=4.0), "top_k", "invalid_type"),
    (_req(top_k=True), "top_k", "invalid_type"), ({"sequences": [[1, 2]], "prompt_lens": [1]}, "top_k", "invalid_value"),
    (_req(dtype="bf16"), "dtype", "invalid_value"), (_req(prompt_lens=[1, 1]), "sequences", "invalid_type"),
    (_req(sequences=[[1, 2.0, 3]]), "sequences", "invalid_type"), (_req(sequences=[[1, -2, 3]]), "sequences", "invalid_type"),
    (_req(sequences=[[1, True, 3]]), "sequences", "invalid_type"), (_req(prompt_lens=[3]), "prompt_lens", "invalid_value"),
    (_req(prompt_lens=[0]), "prompt_lens", "invalid_value"), (_req(prompt_lens=["1"]), "prompt_lens", "invalid_value"),
    (_req(sequences=[[1, 2], [3, 4], [5, 6]], prompt_lens=[1, 1, 1]), "sequences", "too_many_sequences"),
    (_req(sequences=[list(range(6)), list(range(6))], prompt_lens=[1, 1]), "sequences", "max_tokens_too_large"),
])
def test_score_requests_are_typed_and_bounded(body, param, code):
    with pytest.raises(GuardError) as e:
        check_score_body(SCORE_PATH, json.loads(json.dumps(body)), POLICY)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    assert check_score_body(SCORE_PATH, _req(), POLICY) == _req()


def test_teacher_routes_and_engine():
    check_route(SCORE_PATH, TEACHER_ROUTES)
    with pytest.raises(GuardError) as e:
        check_route("/v1/chat/completions", TEACHER_ROUTES)  # the teacher generates nothing for clients
    assert e.value.status == 404
    cfg = TeacherServiceConfig(model="/m", limits={"max_top_k": 32})
    kw = engine_kwargs(cfg, 1 << 26)
    assert kw["enable_prefix_caching"] is False and kw["max_logprobs"] == 32 and kw["load_format"] == "safetensors"
    with pytest.raises(ValueError, match="teacher_service.engine_kwargs.enable_prefix_caching"):
        TeacherServiceConfig(engine_kwargs={"enable_prefix_caching": True})
    with pytest.raises(ValueError, match="teacher_service.engine_kwargs must not set"):
        engine_kwargs(TeacherServiceConfig(engine_kwargs={"model": "x"}))


def test_distillation_finds_the_teacher_service_of_its_own_config():
    from rayjobs.config import PipelineConfig

    base = {"name": "t", "generation": {"teacher": "/t", "input": {"path": "x.jsonl"}, "output": "g"},
            "teacher_service": {"port": 8123, "host": "0.0.0.0", "api_key_file": "/run/key"}}
    cfg = PipelineConfig.model_validate({**base, "distillation": {
        "student": "/s", "output": "o", "loss": {"kind": "logit"}, "teacher": {"source": "service"}}})
    ref = cfg.distillation.teacher.service
    assert ref.url == "http://127.0.0.1:8123/teacher" and ref.api_key_file == "/run/key"
    assert cfg.teacher_service.model == "/t" and cfg.distillation.service_teacher
    cfg = PipelineConfig.model_validate({**base, "distillation": {
        "student": "/s", "output": "o", "loss": {"kind": "logit"},
        "teacher": {"source": "service", "service": {"url": "https://teacher.example:443/t"}}}})
    assert cfg.distillation.teacher.service.url == "https://teacher.example:443/t"
