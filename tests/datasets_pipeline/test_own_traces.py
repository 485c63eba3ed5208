"""Bring your own traces (#16): supplied teacher responses as samples, scored or not.

Fast: the config knobs and their refusals, the response check and its rejects, the supplied
sample and the scoring request a row becomes, the scored top-k slice, and distillation's refusal of
logit KD on supplied, unscored shards. The real pipelines are in ``test_own_traces_integration.py``.
"""

import json

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from cluster.errors import ConfigError
from datasets_pipeline import records as R
from datasets_pipeline.config import GenerationConfig, InputConfig
from datasets_pipeline.prompts import NoResponse, to_response
from datasets_pipeline.stages import InputRejects, StudentStage, SuppliedStage, compact_scored_output

RESPONSE = "<think>\n7+5+0=12\n4+8+1=13\n</think>\n132"
MESSAGES = [{"role": "user", "content": "What is 47 + 85?"}]


def _gen(**kw) -> GenerationConfig:
    return GenerationConfig.model_validate({"teacher": "t", "input": {"path": "in.jsonl", "response_field": "response"},
                                            "output": "out", **kw})


def test_own_traces_config_knobs_must_agree():
    assert _gen().samples_source == "supplied" and not _gen().runs_engine
    scored = _gen(score_supplied=True, sampling={"logprobs_topk": 4})
    assert scored.runs_engine
    plain = GenerationConfig(teacher="t", input={"path": "in.jsonl"}, output="out")
    assert plain.samples_source == "generated" and plain.runs_engine
    bad = {
        "score_supplied needs input.response_field": dict(input={"path": "in.jsonl"}, score_supplied=True,
                                                           sampling={"logprobs_topk": 4}),
        "score_supplied needs sampling.logprobs_topk": dict(score_supplied=True),
        "set score_supplied: true, or logprobs_topk: 0": dict(sampling={"logprobs_topk": 4}),
        "sampling.n must be 1": dict(sampling={"n": 2}),
    }
    for message, kw in bad.items():
        with pytest.raises(ValidationError, match=message):
            _gen(**kw)


def _pipeline(tmp_path, *sets: str):
    from rayjobs.config import load_config

    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump({
        "name": "own",
        "generation": {"teacher": "t", "output": "gen", "input": {"path": "in.parquet", "response_field": "response"}},
        "distillation": {"student": "s", "output": "distill", "loss": {"kind": "logit"}},
    }))
    return load_config(path, list(sets))


def test_own_traces_logit_kd_on_unscored_traces_is_refused_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match="generation.score_supplied: true") as e:
        _pipeline(tmp_path)
    assert "distillation.loss.kind 'logit'" in str(e.value) and "own.yaml" in str(e.value)
    # Each way out the message names is accepted.
    _pipeline(tmp_path, "generation.score_supplied=true", "generation.sampling.logprobs_topk=4")
    _pipeline(tmp_path, "distillation.loss.kind=data")
    _pipeline(tmp_path, "distillation.teacher.source=online")
    # Shards from elsewhere are not described by this generation block: the manifest decides at train start.
    _pipeline(tmp_path, "distillation.data=other-shards")


def test_own_traces_distillation_refuses_unscored_shards_by_their_manifest(tmp_path):
    """At train start, before Ray: the shards' manifest says their samples were supplied and not scored."""
    import ray

    from rayjobs import distill
    from rayjobs.distillation.config import DistillationConfig
    from rayjobs.distillation.plan import check_teacher_signal

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"complete": True, "samples_source": "supplied", "topk_k": 0}))
    cfg = _pipeline(tmp_path, f"distillation.data={shards}")
    ray_was_up = ray.is_initialized()  # a session fixture of other tests may have started it
    with pytest.raises(ConfigError, match="generation.score_supplied: true") as e:
        distill.train(cfg)
    assert str(shards) in str(e.value) and (ray_was_up or not ray.is_initialized())
    d = DistillationConfig(student="s", output="o", loss={"kind": "logit"})
    check_teacher_signal(d, {"samples_source": "supplied", "topk_k": 4})  # scored: fine
    check_teacher_signal(d, {"samples_source": "generated", "topk_k": 0})  # check_supported's case
    check_teacher_signal(DistillationConfig(student="s", output="o"), {"samples_source": "supplied", "topk_k": 0})


def test_own_traces_missing_or_empty_responses_say_why():
    cfg = InputConfig(path="x", response_field="response")
    assert to_response({"response": RESPONSE}, cfg) == RESPONSE
    cases = {R.MISSING_RESPONSE: [{}, {"response": None}, {"response": ["a"]}],
             R.EMPTY_RESPONSE: [{"response": ""}, {"response": " \n"}]}
    for reason, rows in cases.items():
        for row in rows:
            with pytest.raises(NoResponse) as e:
                to_response(row, cfg)
            assert e.value.reason == reason and "'response'" in str(e.value)


def _cfg(teacher: str, **kw) -> dict:
    return {"teacher": teacher, "input": {"path": "x.jsonl", "response_field": "response"}, "output": "out",
            "preprocess": {"val_fraction": 0.0}, **kw}


def _row(source="traces.jsonl:1", **fields) -> dict:
    return {"source": source, "raw": json.dumps({"id": "r1", "messages": MESSAGES, **fields}).encode(), "error": None}


def test_own_traces_rows_without_a_response_are_rejects_with_the_reason(tok_dirs):
    path = tok_dirs[0]
    check = InputRejects(_cfg(path), path)
    assert check(_row(response=RESPONSE, answer="132")) == []
    [missing] = check(_row("traces.jsonl:2"))
    [empty] = check(_row("traces.jsonl:3", response="  "))
    [no_prompt] = check({"source": "traces.jsonl:4", "raw": b'{"response": "x"}', "error": None})
    assert (missing["stage"], missing["reason"]) == ("response", R.MISSING_RESPONSE)
    assert (empty["stage"], empty["reason"]) == ("response", R.EMPTY_RESPONSE)
    assert missing["detail"].startswith("missing field 'response' | {") and no_prompt["stage"] == "input"
    # The sample stage drops them (they are recorded by InputRejects above), it never raises.
    stage = SuppliedStage(_cfg(path), path)
    assert stage(_row("traces.jsonl:2")) == stage(_row(response="")) == []


def test_own_traces_a_supplied_response_is_a_sample_the_student_stage_takes(tok_dirs):
    path, tok = tok_dirs[0], tok_dirs[2]
    [sample] = SuppliedStage(_cfg(path), path)(_row(response=RESPONSE, answer="132"))
    tokens = tok(RESPONSE, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert sample["sample_id"] == "r1/0" and sample["generated_text"] == RESPONSE
    assert sample["generated_tokens"].tolist() == tokens and len(sample["topk_ids"]) == 0
    out = StudentStage(_cfg(path), path, path)(sample)
    assert out["status"] == "ok" and out["verified"] is True and out["answer"] == "132"
    assert out["reasoning"] == "7+5+0=12\n4+8+1=13" and out["teacher_token_ids"] == tokens
    assert out["input_ids"][out["teacher_offset"]:] == tokens and out["topk_k"] == 0


def test_own_traces_scoring_request_and_its_top_k_slice(tok_dirs):
    path, tok = tok_dirs[0], tok_dirs[2]
    cfg = _cfg(path, score_supplied=True, sampling={"logprobs_topk": 2})
    [request] = SuppliedStage(cfg, path)(_row(response=RESPONSE))
    prompt_ids = tok(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True))["input_ids"]
    tokens = tok(RESPONSE, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert request["tokenized_prompt"] == prompt_ids + tokens and request["response_start"] == len(prompt_ids)
    assert request["sampling_params"] == {"temperature": 0.0, "max_tokens": 1, "detokenize": False,
                                          "prompt_logprobs": 2}
    # What vLLM answers: per position of the whole sequence (None first), the top-2 plus the token itself.
    seq = request["tokenized_prompt"]
    logprobs = [None] + [{t: {"logprob": -0.5}, 7: {"logprob": -1.0}, 9: {"logprob": -3.0}} for t in seq[1:]]
    sample = compact_scored_output({**request, "prompt_logprobs": logprobs, "generated_text": "x"}, k=2)
    ids = np.asarray(sample["topk_ids"]).reshape(-1, 2)
    assert sample["generated_text"] == RESPONSE and sample["generated_tokens"].tolist() == tokens
    assert ids.shape == (len(tokens), 2) and ids[:, 0].tolist() == tokens
    out = StudentStage(cfg, path, path)(sample)
    assert out["status"] == "ok" and out["topk_k"] == 2 and len(out["topk_ids"]) == 2 * len(tokens)


def test_own_traces_preflight_wants_a_response_in_the_first_rows(tmp_path):
    from datasets_pipeline.preflight import check_input

    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES, "answer": "132"}) + "\n")
    cfg = InputConfig(path=str(path), response_field="response")
    [problem] = check_input(cfg, str(path))
    assert "missing field 'response'" in problem
    path.write_text(json.dumps({"messages": MESSAGES, "response": RESPONSE}) + "\n")
    assert check_input(cfg, str(path)) == []
