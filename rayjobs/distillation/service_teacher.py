"""``teacher.source: service``: the stored samples scored on the fly by the teacher scoring service.

Why: stored top-k fixes k and the teacher at generation time and costs ~k x 6 bytes per token on
disk; the online teacher puts a whole teacher into every training worker. The service
(``service.teacher``) is a separate, autoscaled vLLM application: the workers send it token ids
and get back the teacher's top-k per position (``service.score_client``), so the teacher never
enters their memory, and it can be shared by several jobs.

What is sent is what generation stored: the teacher's chat-rendered prompt and the completion's
``teacher_token_ids``. The service's position ``j`` is then the teacher's distribution over
generated token ``j``, exactly the layout of the stored ``topk_ids`` / ``topk_logprobs``. So this
module only refills those two columns and hands the batch to the ordinary ``collate``:
same-tokenizer rows line up by ``teacher_offset``, cross-tokenizer rows through the stored
``teacher_align`` and the collate's vocabulary map, exactly as on the stored path. Rows with neither (stripped reasoning, texts that did not align) are not sent.

It runs where the collate runs, in Ray Data's prefetch threads, so a request overlaps the
previous micro-batch's compute. Pure: no Ray, no vLLM; of ``service/`` it uses only the client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from datasets_pipeline.targets import render_prompt
from rayjobs.distillation.collate import CollateSettings, collate
from rayjobs.distillation.config import TeacherServiceRef

SERVICE_COLUMNS = ("messages", "teacher_token_ids", "teacher_align")


def client_for(ref: TeacherServiceRef):
    """The retrying client, with the key read here (in the worker, where the Secret or env var lives)."""
    from service.score_client import TeacherClient

    return TeacherClient.with_key_from(ref.url, ref.api_key_env, ref.api_key_file, timeout_s=ref.timeout_s,
                                       retries=ref.retries)


class ServiceTopK:
    """Batch columns -> the same columns with ``topk_*`` filled in by the scoring service."""

    def __init__(self, client, teacher_tok, top_k: int):
        self.client, self.teacher_tok, self.top_k = client, teacher_tok, top_k
        self.scored_tokens = 0

    def _request(self, batch: Mapping[str, Sequence]) -> tuple[list[int], list[list[int]], list[int]]:
        """Rows that get KD, with their teacher sequences (prompt + generated tokens) and prompt lengths."""
        rows, seqs, lens = [], [], []
        for r in range(len(batch["input_ids"])):
            generated = [int(t) for t in batch["teacher_token_ids"][r]]
            aligned = int(batch["teacher_offset"][r]) >= 0 or len(batch["teacher_align"][r]) > 0
            if not generated or not aligned:
                continue
            prompt = self.teacher_tok(render_prompt(self.teacher_tok, json.loads(batch["messages"][r])),
                                      add_special_tokens=False)["input_ids"]
            rows.append(r)
            seqs.append(list(prompt) + generated)
            lens.append(len(prompt))
        return rows, seqs, lens

    def __call__(self, batch: Mapping[str, Sequence]) -> dict:
        n = len(batch["input_ids"])
        out = {**batch, "topk_k": np.zeros(n, np.int64), "topk_ids": [np.zeros(0, np.int64)] * n,
               "topk_logprobs": [np.zeros(0, np.float32)] * n}
        rows, seqs, lens = self._request(batch)
        if not rows:
            return out
        for r, scores in zip(rows, self.client.score(seqs, lens, self.top_k), strict=True):
            out["topk_k"][r] = self.top_k
            out["topk_ids"][r] = scores.topk_ids.reshape(-1)
            out["topk_logprobs"][r] = scores.topk_logprobs.reshape(-1)
            self.scored_tokens += len(scores)
        return out


class ServiceCollate:
    """``collate`` over a batch whose teacher top-k come from the service."""

    def __init__(self, settings: CollateSettings, topk: ServiceTopK):
        self.settings, self.topk = settings, topk

    def __call__(self, batch: Mapping[str, Sequence]):
        return collate(self.topk(batch), self.settings)
