"""The Serve application: ``service.app:build_app`` (what ``serve run`` / KubeRay import).

One deployment that is both the HTTP ingress and the engine: ray.serve.llm's ``LLMServer``
running vLLM's own OpenAI app (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, ``/health``, streaming), with ``service.guard`` as ASGI middleware in front.
This is the topology of ray.serve.llm's "direct streaming" mode without its HAProxy-only
request router: each request crosses the proxy (HAProxy, or Serve's Python proxy) and one
replica, instead of the proxy, an ``OpenAiIngress`` replica and the ``LLMServer`` replica
that ``build_openai_app`` chains; on a 2-core machine every extra Python hop is CPU taken
from the engine (bench/serve.py). Autoscaling is Serve's (``service.llm_config.deployment_config``);
the bounded queue with fast 503s is the guard's (``service.errors.Capacity``), because Serve's
own full-queue 503 is plain text that no application code can shape.

LoRA adapters are localized on each replica's node and registered with vLLM at start-up;
clients ask for them as ``<model_id>:<adapter>``.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer

from cluster.storage import follow_release, is_s3, localize
from service.config import EngineServiceConfig, ServingConfig
from service.guard import GuardMiddleware, GuardPolicy, RequestLog, check_exposure
from service.llm_config import adapter_model_id, kv_cache_size, llm_config_kwargs

log = logging.getLogger(__name__)

DEPLOYMENT_PREFIX = "LLMServer:"


def deployment_name(cfg: ServingConfig) -> str:
    """The engine deployment's name in ``serve.status()`` (ray.serve.llm's naming)."""
    return DEPLOYMENT_PREFIX + cfg.model_id.replace("/", "--").replace(".", "_")


def checked_policy(policy: GuardPolicy, cfg: EngineServiceConfig) -> GuardPolicy:
    """The replica's policy after the exposure check: fail before the engine starts, not after."""
    check_exposure(cfg.host, policy.api_key, cfg.allow_unauthenticated)
    if policy.api_key is None:
        log.warning("%s without an API key: set %s or api_key_file", cfg.section, cfg.api_key_env)
    return policy


def add_guard(app, **guard_kwargs):
    """Put ``GuardMiddleware`` outermost on vLLM's app: auth and limits run before anything else."""
    # vLLM builds its middleware stack eagerly; drop it so Starlette rebuilds it with ours.
    app.middleware_stack = None
    app.add_middleware(GuardMiddleware, **guard_kwargs)
    return app


class GuardedLLMServer(LLMServer):
    """``LLMServer`` plus the guard, the request log and start-up LoRA loading."""

    async def __init__(self, llm_config: LLMConfig, *, serving: dict):
        self._serving = ServingConfig.model_validate(serving)
        # Read the key here, in the replica, where the Secret or env var lives; fail before the
        # engine starts if a configured key file is missing.
        self._policy = checked_policy(GuardPolicy.from_config(self._serving), self._serving)
        rl = self._serving.request_log
        self._request_log = RequestLog(rl.path, rl.batch_rows, rl.flush_interval_s) if rl.enabled else None
        await super().__init__(llm_config)
        await self._load_adapters()

    async def _load_adapters(self) -> None:
        # Internal type, but the one LLMServer itself hands to engine.resolve_lora.
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        for i, (name, location) in enumerate(self._serving.adapters.items(), start=1):
            path = await asyncio.to_thread(localize, location)
            model_id = adapter_model_id(self._serving.model_id, name)
            disk = DiskMultiplexConfig(model_id=model_id, local_path=path, max_total_tokens=None,
                                       lora_assigned_int_id=i)
            await self.engine.resolve_lora(disk)
            log.info("LoRA adapter %s loaded from %s", model_id, location)

    async def __serve_build_asgi_app__(self):
        app = await super().__serve_build_asgi_app__()
        return add_guard(
            app,
            policy=self._policy,
            request_log=self._request_log,
            include_completions=self._serving.request_log.include_completions,
            redact_pii=self._serving.request_log.redact_pii,
        )

    async def __del__(self):
        if getattr(self, "_request_log", None) is not None:
            await self._request_log.close()
        await super().__del__()


def build_llm_config(cfg: EngineServiceConfig) -> LLMConfig:
    """The ``LLMConfig`` of either endpoint (student or teacher): one engine configuration path."""
    if not cfg.model:
        raise ValueError(f"{cfg.section}.model is not set (the pipeline config fills it in)")
    # s3://: ray.serve.llm downloads it on each replica's node. Named references (demo:) were
    # resolved to a path by the job before it built this app.
    version = follow_release(cfg.model)
    resolved = version if is_s3(version) else localize(version)
    kv = kv_cache_size(cfg, resolved)
    if kv is not None:
        log.info("KV cache %.3f GiB per replica (%s)", kv.gib, kv.how)
    return LLMConfig(**llm_config_kwargs(cfg, resolved, kv.bytes if kv else None))


def engine_deployment(cfg: EngineServiceConfig, server_cls: type, name_prefix: str, config_kwarg: str):
    """The bound Serve application: one engine deployment of ``server_cls`` that is also the ingress,
    which gets ``cfg`` (as JSON) in its ``config_kwarg`` keyword argument."""
    return build_llm_deployment(
        build_llm_config(cfg),
        name_prefix=name_prefix,
        bind_kwargs={config_kwarg: cfg.model_dump(mode="json")},
        deployment_cls=serve.ingress()(server_cls),
    )


def build_app(args: dict):
    """``args`` is ``ServingConfig.model_dump(mode="json")`` (KubeRay's serveConfigV2 args)."""
    return engine_deployment(ServingConfig.model_validate(args), GuardedLLMServer, DEPLOYMENT_PREFIX, "serving")
