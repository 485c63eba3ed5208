"""The teacher engine as our own Ray Data stage: vLLM in the actor, arrays out, student work fused in.

Why not ``ray.data.llm``'s processor: it turned every top-k entry into a ``Logprob`` object, a
decoded token string, a dict and a validated pydantic field, then handed rows to a second actor
for parsing and student tokenization (profile in ``bench/GENERATION_PROFILE.md``). Here each
engine actor asks vLLM for flat logprobs without detokenization, builds ``int32[T, k]`` ids and
``float16[T, k]`` logprobs straight from them (generated tokens, or a supplied response's prompt
logprobs when scoring), decodes each completion once, and runs ``StudentStage`` on the same rows
before they leave the actor as one Arrow block.

vLLM is imported in the actor only; this module imports no Ray (Ray Data calls the class).
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pyarrow as pa

from cluster.storage import localize

from datasets_pipeline import records as R
from datasets_pipeline.engine import engine_request_params
from datasets_pipeline.stages import StudentStage, compact_scored_output, preprocess_error
from datasets_pipeline.topk import topk_from_flat

# What leaves the stage: a sample record plus the outcome the driver counts and sets aside.
STAGE_SCHEMA = R.SAMPLE_SCHEMA.append(pa.field("status", pa.string())).append(
    pa.field("stage", pa.string())).append(pa.field("detail", pa.string())).append(pa.field("prompt", pa.string()))


class EngineLoop:
    """Continuous batching over one vLLM engine for batches handed in by several threads at once.

    Ray Data calls the stage from several threads of the actor; each call adds its requests, and
    whichever call holds the lock steps the engine for all of them. A new batch thus joins the
    running one instead of waiting for its slowest sequence, as in ``ray.data.llm``'s engine stage.
    """

    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.finished: dict[str, object] = {}
        self.ids = itertools.count()

    def run(self, requests: list[tuple]) -> list:
        """One RequestOutput per (prompt, params), or the exception vLLM raised refusing that prompt."""
        results: list = [None] * len(requests)
        mine: dict[str, int] = {}
        with self.lock:
            for i, (prompt, params) in enumerate(requests):
                rid = str(next(self.ids))
                try:
                    self.engine.add_request(rid, prompt, params)
                    mine[rid] = i
                except Exception as e:  # this prompt is refused (too long, ...), not the batch
                    results[i] = e
        while mine:
            with self.lock:
                for rid in [r for r in mine if r in self.finished]:
                    results[mine.pop(rid)] = self.finished.pop(rid)
                if mine:
                    for out in self.engine.step():
                        if out.finished:
                            self.finished[out.request_id] = out
        return results


class TeacherStage:
    """Engine requests (PromptStage rows, or SuppliedStage's scoring rows) -> StudentStage rows, as one
    Arrow block per batch. Each request carries its own ``sampling_params``, as ray.data.llm's did."""

    def __init__(self, cfg: dict, teacher_path: str, student_path: str, engine_kwargs: dict):
        from vllm import LLM

        self.student = StudentStage(cfg, teacher_path, student_path)
        self.k = self.student.cfg.sampling.logprobs_topk
        # The weights from this node's copy (an s3:// teacher is fetched once per node): on a
        # cluster, the driver's disk is not the engine's.
        self.llm = LLM(model=localize(teacher_path), **engine_kwargs)
        self.loop = EngineLoop(self.llm.llm_engine)
        self.params: dict[tuple, object] = {}
        # Tokenizers are not safe to share between threads ("Already borrowed"): one batch at a time
        # is decoded and tokenized, while the engine loop keeps generating for the others.
        self.student_lock = threading.Lock()

    def _params(self, request_params: dict):
        """vLLM SamplingParams of a request's params (``engine_request_params``), built once per kind."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        key = tuple(sorted(request_params.items()))
        if key not in self.params:
            self.params[key] = SamplingParams(**engine_request_params(request_params),
                                              output_kind=RequestOutputKind.FINAL_ONLY)
        return self.params[key]

    def __call__(self, batch: pa.Table) -> pa.Table:
        requests = batch.to_pylist()
        scoring = "tokenized_prompt" in batch.column_names
        outs = self.loop.run([({"prompt_token_ids": r["tokenized_prompt"]} if scoring else r["prompt"],
                               self._params(r.pop("sampling_params"))) for r in requests])
        with self.student_lock:
            return R.rows_table(self._rows(requests, outs, scoring), STAGE_SCHEMA)

    def _rows(self, requests: list[dict], outs: list, scoring: bool) -> list[dict]:
        """StudentStage rows; a row whose engine output cannot be read is set aside, not the batch."""
        done = [] if scoring else [o.outputs[0].token_ids for o in outs if not isinstance(o, Exception)]
        texts = iter(self.student.teacher_tok.batch_decode(done, skip_special_tokens=True,
                                                           clean_up_tokenization_spaces=False))
        rows = []
        for row, out in zip(requests, outs):
            if isinstance(out, Exception):
                rows.append(self.student({**row, "generated_text": "",
                                          "__inference_error__": f"{type(out).__name__}: {out}"}))
                continue
            text = None if scoring else next(texts)
            try:
                sample = self._sample(row, out, text)
            except Exception as e:  # one odd output is set aside, never the end of the run
                rows.append(preprocess_error(row, e))
                continue
            rows.append(self.student(sample))
        return rows

    def _sample(self, row: dict, out, text: str | None) -> dict:
        """The teacher sample StudentStage takes, top-k as arrays straight from vLLM's flat logprobs."""
        if text is None:  # scoring: the supplied response's slice of the prompt logprobs
            return compact_scored_output({**row, "prompt_logprobs": out.prompt_logprobs}, self.k)
        gen = out.outputs[0]
        ids, lps = topk_from_flat(gen.logprobs, self.k)
        return {**row, "generated_text": text, "generated_tokens": np.asarray(gen.token_ids, np.int32),
                "topk_ids": ids, "topk_logprobs": lps}
