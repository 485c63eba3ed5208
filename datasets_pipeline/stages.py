"""The per-row stages around the vLLM engine, as Ray Data callables.

Each stage is a plain class over one row (so tests can call it without Ray) that
loads its tokenizer once per actor. Rows that fail get ``status`` set to the
reason and flow on to the driver, which counts and sets them aside.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from cluster.pii import redact, redact_messages
from cluster.storage import localize

from datasets_pipeline import records as R
from datasets_pipeline.alignment import tokenizer_decoder
from datasets_pipeline.answers import CHECKERS, split_reasoning
from datasets_pipeline.config import GenerationConfig
from datasets_pipeline.engine import sampling_params, scoring_params
from datasets_pipeline.prompts import (NoResponse, Prompt, Rejected, parse_json_line, preview, split_of, to_prompt,
                                       to_response)
from datasets_pipeline.targets import TooLong, build_student_example, render_prompt, same_vocabulary
from datasets_pipeline.topk import topk_from_flat


def _load_tokenizer(ref: str):
    """Runs in the stage's actor: an s3:// model's tokenizer files are copied to the cache of the node
    the actor is on (on a cluster, the driver's copy would be on another disk)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(localize(ref, tokenizer_only=True))


class TemplateRefused(Exception):
    """The teacher's chat template raised on a prompt's messages (roles, their order, ...)."""


def _prompt(record: dict, cfg: GenerationConfig) -> Prompt:
    """The input record's prompt, its messages redacted when ``preprocess.redact_pii`` says so (before
    they are rendered, generated from or written: the served request log is next round's input)."""
    prompt = to_prompt(record, cfg.input)
    if cfg.preprocess.redact_pii:
        prompt = replace(prompt, messages=redact_messages(prompt.messages))
    return prompt


def _render(tokenizer, messages: list[dict]) -> str:
    """``render_prompt``, a refusal raised as ``TemplateRefused``: templates raise anything (jinja's
    ``raise_exception``, ``TypeError`` on an odd role), and one such row crashed every (re)run."""
    try:
        return render_prompt(tokenizer, messages)
    except Exception as e:  # whatever the template raised, this row is set aside, not the run
        raise TemplateRefused(f"{type(e).__name__}: {e}"[:500]) from None


class _InputStage:
    """A stage over input rows: the config and the teacher's tokenizer (its chat template), loaded once
    per actor; ``done``: what committed shards already hold (sources, prompt ids), skipped on resume."""

    def __init__(self, cfg: dict, teacher_path: str, done: set[str] = frozenset()):
        self.cfg = GenerationConfig.model_validate(cfg)
        self.tokenizer = _load_tokenizer(teacher_path)
        self.done = done


class InputRejects(_InputStage):
    """Emit one reject row per input row that cannot become a prompt, that the chat template refuses,
    or (``input.response_field``) whose response is missing or empty.

    It renders every prompt (as PromptStage does) so that a refused one is recorded here, beside the
    other input rejects; PromptStage and SuppliedStage just drop it.
    """

    def __call__(self, row: dict) -> list[dict]:
        if row["source"] in self.done:
            return []
        if row.get("error"):  # a file, or the rest of one, that could not be read (sources)
            return [{"source": row["source"], "stage": "input", "reason": row["error"], "detail": None}]
        try:
            record = parse_json_line(row["raw"])
            _render(self.tokenizer, _prompt(record, self.cfg).messages)
            if self.cfg.input.response_field:
                to_response(record, self.cfg.input)
            return []
        except NoResponse as e:
            stage, reason, why = "response", e.reason, f"{e} | "
        except Rejected as e:
            stage, reason, why = "input", str(e), ""
        except TemplateRefused as e:
            stage, reason, why = "prompt", R.CHAT_TEMPLATE, f"{e} | "
        detail = preview(row["raw"])
        detail = redact(detail) if self.cfg.preprocess.redact_pii else detail
        return [{"source": row["source"], "stage": stage, "reason": reason, "detail": why + detail}]


class PromptStage(_InputStage):
    """Valid input row -> n engine requests with the teacher's chat template applied."""

    def __call__(self, row: dict) -> list[dict]:
        try:
            prompt = _prompt(parse_json_line(row["raw"]), self.cfg)
            if prompt.prompt_id in self.done:
                return []
            text = _render(self.tokenizer, prompt.messages)
        except (Rejected, TemplateRefused):  # recorded by InputRejects
            return []
        return [{**_sample_keys(prompt, self.cfg, i), "prompt": text, "sampling_params": sampling_params(self.cfg)}
                for i in range(self.cfg.sampling.n)]


# What identifies a sample (and carries its prompt) from the first stage to the shards.
SAMPLE_KEYS = ("prompt_id", "sample_id", "sample_index", "split", "messages", "reference")


def _sample_keys(prompt: Prompt, cfg: GenerationConfig, index: int) -> dict:
    """``SAMPLE_KEYS`` of sample ``index`` of ``prompt``."""
    return {
        "prompt_id": prompt.prompt_id,
        "sample_id": f"{prompt.prompt_id}/{index}",
        "sample_index": index,
        "split": split_of(prompt.prompt_id, cfg.preprocess.val_fraction, cfg.preprocess.split_seed),
        "messages": json.dumps(prompt.messages, ensure_ascii=False),
        "reference": prompt.reference,
    }


class SuppliedStage(_InputStage):
    """Valid input row with its response (``input.response_field``) -> the teacher sample it supplies.

    The sample has the engine stage's sample columns (``supplied_sample``), so ``StudentStage``
    treats it as a generated one. Its teacher tokens are the teacher tokenizer's encoding of the
    response plus the teacher's eos, as a generation that stopped on its own ends: the truncation
    filter (a budget of our own sampling) then never fires on supplied text. With ``score_supplied``
    the row is instead a scoring request for the engine (``scoring_params``): prompt + response
    tokens, the prompt tokenized as vLLM tokenizes a text prompt in generation, so the teacher is
    conditioned as it would have been had it generated the response; ``compact_scored_output``
    turns the engine's answer into the sample.
    """

    def __call__(self, row: dict) -> list[dict]:
        try:
            record = parse_json_line(row["raw"])
            prompt = _prompt(record, self.cfg)
            if prompt.prompt_id in self.done:
                return []
            text = _render(self.tokenizer, prompt.messages)
            response = to_response(record, self.cfg.input)
        except (Rejected, TemplateRefused):  # recorded by InputRejects
            return []
        tokens = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        tokens = tokens + ([eos] if eos is not None and (not tokens or tokens[-1] != eos) else [])
        keys = _sample_keys(prompt, self.cfg, 0)
        if not self.cfg.score_supplied:
            return [supplied_sample(keys, response, tokens)]
        prompt_ids = self.tokenizer(text)["input_ids"]
        return [{**keys, "response": response, "response_tokens": tokens, "response_start": len(prompt_ids),
                 "tokenized_prompt": prompt_ids + tokens, "sampling_params": scoring_params(self.cfg)}]


def supplied_sample(keys: dict, response: str, tokens, topk_ids=(), topk_logprobs=()) -> dict:
    """A supplied response as the teacher sample ``StudentStage`` takes (as ``teacher.TeacherStage``
    builds a generated one: text, token ids, top-k as flat int32 / float16 arrays)."""
    return {**keys, "prompt": "", "generated_text": response, "generated_tokens": np.asarray(tokens, np.int32),
            "topk_ids": np.asarray(topk_ids, np.int32), "topk_logprobs": np.asarray(topk_logprobs, np.float16)}


def compact_scored_output(row: dict, k: int) -> dict:
    """A scoring request's engine answer -> the sample: the response positions' top-k, stored as generation's.

    vLLM's ``prompt_logprobs[i]`` is the teacher's distribution over token ``i`` given the tokens
    before it, so the response's slice is exactly what generation stores per generated token. Both
    of vLLM's forms are read: flat (``topk_from_flat``, the engine stage's) and per-position dicts.
    """
    start, tokens = int(row["response_start"]), _seq(row["response_tokens"])
    ids, lps = topk_from_flat((row.get("prompt_logprobs") or [])[start:start + len(tokens)], k)
    return supplied_sample({key: row[key] for key in SAMPLE_KEYS}, row["response"], tokens, ids, lps)


def _seq(x):
    """Empty arrays can come back from Arrow as None."""
    return [] if x is None else x


def preprocess_error(row: dict, error: Exception) -> dict:
    """The student row of a sample that raised on its way to the student: set aside, with the error."""
    return {**{k: row[k] for k in SAMPLE_KEYS}, "prompt": "", "completion": "", "reasoning": None, "answer": "",
            "verified": None, "teacher_token_ids": [], "topk_k": 0, "topk_ids": [], "topk_logprobs": [],
            "input_ids": [], "prompt_len": 0, "teacher_offset": -1, "teacher_align": [],
            "status": R.PREPROCESS_ERROR, "stage": "preprocess", "detail": f"{type(error).__name__}: {error}"[:500]}


class StudentStage:
    """Parse, verify and filter a teacher sample, then tokenize it for the student."""

    def __init__(self, cfg: dict, teacher_path: str, student_path: str):
        self.cfg = GenerationConfig.model_validate(cfg)
        self.teacher_tok = _load_tokenizer(teacher_path)
        self.student_tok = _load_tokenizer(student_path)
        self.aligned = same_vocabulary(self.teacher_tok, self.student_tok)
        self.checker = CHECKERS[self.cfg.preprocess.checker]

    def __call__(self, row: dict) -> dict:
        out = {k: row[k] for k in SAMPLE_KEYS}
        out["prompt"] = ""  # the engine request, filled in for engine errors only (see _engine_error)
        try:
            return self._process(row, out)
        except Exception as e:  # one odd sample is set aside, never the end of the run
            return preprocess_error(row, e)

    def _process(self, row: dict, out: dict) -> dict:
        out.update(status="ok", stage="filter", detail=None)
        completion = row["generated_text"]
        tokens = [int(t) for t in _seq(row.get("generated_tokens"))]
        topk_ids, topk_lps = _seq(row.get("topk_ids")), _seq(row.get("topk_logprobs"))
        reasoning, answer = split_reasoning(completion)
        reference = row.get("reference")
        out.update(
            completion=completion,
            reasoning=reasoning,
            answer=answer,
            verified=None if reference is None else bool(self.checker(answer, reference)),
            teacher_token_ids=tokens,
            topk_k=self.cfg.sampling.logprobs_topk if len(topk_ids) else 0,
            topk_ids=topk_ids,
            topk_logprobs=topk_lps,
            input_ids=[],
            prompt_len=0,
            teacher_offset=-1,
            teacher_align=[],
        )
        # The engine stage marks the requests vLLM refused with __inference_error__.
        error = row.get("__inference_error__")
        if error:
            return self._engine_error(row, out, error)
        eos = self.teacher_tok.eos_token_id
        hit_limit = len(tokens) >= self.cfg.sampling.max_new_tokens and (not tokens or tokens[-1] != eos)
        if hit_limit and self.cfg.preprocess.drop_truncated:
            return {**out, "status": R.TRUNCATED, "detail": f"{len(tokens)} tokens, no end of sequence"}
        try:
            ex = build_student_example(
                self.student_tok,
                json.loads(row["messages"]),
                completion,
                answer,
                tokens,
                reasoning_policy=self.cfg.preprocess.reasoning,
                max_len=self.cfg.student_max_len or 1 << 30,
                aligned_vocab=self.aligned,
                teacher_decode=None if self.aligned else tokenizer_decoder(self.teacher_tok),
            )
        except TooLong as e:
            return {**out, "status": R.TOO_LONG_FOR_STUDENT, "detail": str(e)}
        out.update(input_ids=ex.input_ids, prompt_len=ex.prompt_len, teacher_offset=ex.teacher_offset,
                   teacher_align=ex.teacher_align)
        return out

    def _engine_error(self, row: dict, out: dict, error) -> dict:
        """An engine error row, carrying its full request ``prompt`` so the driver can retry it as is.

        Rendering it again here, from the row's messages, keeps tokenizers off the driver and one
        shape for both kinds of request (a scoring request carries token ids, not a prompt).
        """
        prompt = render_prompt(self.teacher_tok, json.loads(row["messages"]))
        return {**out, "prompt": prompt, "status": R.ENGINE_ERROR, "stage": "engine", "detail": str(error)[:500]}
