"""The teacher scoring service: ``service.teacher:build_app`` (what ``serve run`` / KubeRay import).

Distillation needs the teacher's view of *given* tokens (stored samples, or the student's own
rollouts), not new text: per continuation position the log-prob of the token that is there and
the teacher's top-k. vLLM computes exactly that as prompt log-probs in one prefill
(``SamplingParams(max_tokens=1, prompt_logprobs=k)``), so the teacher runs as its own
autoscaled Serve application and never enters a training worker's memory.

Same engine path as the student endpoint (``service.app``): ray.serve.llm's ``LLMServer`` built
from ``service.llm_config`` (KV cache sized by ``cluster.kv_cache``, safetensors only, the
``trust_remote_code`` switch, autoscaling on ongoing requests), with ``service.guard`` in front
(the same API key handling; typed limits of ``service.limits.check_score_body``). Its only
route besides ``/health`` is ``POST /v1/token_scores``: JSON token ids in, the binary body of
``service.score_codec`` out. Prefix caching is off (``TeacherServiceConfig.engine_defaults``):
a cached prefix is not prefilled, so it would have no prompt log-probs.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from ray.serve.llm import LLMConfig
from ray.serve.llm.deployment import LLMServer

from service.app import add_guard, checked_policy, engine_deployment
from service.config import TeacherServiceConfig
from service.guard import GuardPolicy
from service.limits import GuardError
from service.score_codec import MEDIA_TYPE, SCORE_PATH, SequenceScores, encode_scores, from_flat_prompt_logprobs


DEPLOYMENT_PREFIX = "TeacherServer:"


def deployment_name(cfg: TeacherServiceConfig) -> str:
    """The engine deployment's name in ``serve.status()`` (ray.serve.llm's naming)."""
    return DEPLOYMENT_PREFIX + cfg.model_id.replace("/", "--").replace(".", "_")


async def score_sequence(engine, ids: list[int], prompt_len: int, k: int) -> SequenceScores:
    """One sequence through the engine: a prefill with prompt log-probs, one throw-away sampled token."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)
    final = None
    async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), params, f"score-{uuid.uuid4().hex}"):
        final = out
    flat = final.prompt_logprobs
    return from_flat_prompt_logprobs(flat.start_indices, flat.end_indices, flat.token_ids, flat.logprobs,
                                     prompt_len, k)


class TeacherServer(LLMServer):
    """``LLMServer`` whose HTTP app is the guard plus the scoring route (vLLM's OpenAI routes are not served)."""

    async def __init__(self, llm_config: LLMConfig, *, teacher: dict):
        self._teacher = TeacherServiceConfig.model_validate(teacher)
        # The key is read here, in the replica, where the Secret or env var lives.
        self._policy = checked_policy(GuardPolicy.for_teacher(self._teacher), self._teacher)
        await super().__init__(llm_config)

    async def __serve_build_asgi_app__(self):
        from starlette.responses import JSONResponse, Response

        app = await super().__serve_build_asgi_app__()
        engine = app.state.engine_client

        async def token_scores(request):
            body = json.loads(await request.body())  # admitted and type-checked by the guard
            k, dtype = body["top_k"], body.get("dtype", "float16")
            try:
                seqs = await asyncio.gather(*(score_sequence(engine, ids, n, k)
                                              for ids, n in zip(body["sequences"], body["prompt_lens"], strict=True)))
            except ValueError as e:  # vLLM's own input checks: ids past the vocabulary, past max_model_len
                err = GuardError(400, str(e), code="invalid_value", param="sequences")
                return JSONResponse(err.body(), status_code=400)
            return Response(encode_scores(list(seqs), k, dtype), media_type=MEDIA_TYPE)

        app.router.add_route(SCORE_PATH, token_scores, methods=["POST"])
        return add_guard(app, policy=self._policy)


def build_app(args: dict):
    """``args`` is ``TeacherServiceConfig.model_dump(mode="json")`` (KubeRay's serveConfigV2 args)."""
    return engine_deployment(TeacherServiceConfig.model_validate(args), TeacherServer, DEPLOYMENT_PREFIX, "teacher")
