"""The on-policy sampler: a vLLM engine on the student's current weights, in its own Ray actor.

The driver starts one ``StudentSampler`` per run (``start``) on the student's initial weights and
names it; every training worker reaches it through a ``SamplerLink``. Every
``on_policy.sync_every`` optimizer steps the trainer refreshes it: the full weights are gathered on
rank 0 (a collective under ZeRO-3), written as an HF directory (LoRA merged into the base) to
``<checkpoint run dir>/sampler_weights`` (local or s3://, so the actor may live on another node),
and the actor reloads them in place (vLLM's ``reload_weights``: no engine restart, the KV cache
and compiled state stay; ``WeightRefresh`` re-ties a tied LM head, which that reload leaves on the
old weights). Cost per refresh = gather + write + read; the curve rows log it
(``sampler_sync_s``, ``sampler_write_s``, ``sampler_reload_s``). With LoRA the whole merged model
is written, not only the adapter: vLLM's LoRA path would add punica kernels and a second weight
set per request for a one-adapter engine; the price is writing the full model each refresh.

Policy lag is the trainer's step minus the step of the sampler's weights (``< sync_every``). A
resumed run refreshes the sampler from the restored weights before its first step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cluster.kv_cache import resolve_kv_cache
from cluster.storage import localize
from rayjobs.distillation.config import OnPolicyConfig
from rayjobs.distillation.on_policy import OnPolicyRows, RolloutStats, continuation_columns, token_budgets


class WeightRefresh:
    """vLLM worker extension (mixed into the engine's worker; called by name through ``collective_rpc``).

    vLLM's layer-wise ``reload_weights`` finds no ``lm_head.weight`` in a tied model's checkpoint and
    puts the head's *old* tensor back, so the head would stop being the (new) embedding: seen here as
    greedy samples that no longer matched transformers on the same weights. The head is tied again
    and re-processed (on CPU that repacks it for the GEMM kernel).
    """

    def refresh_weights(self, path: str) -> None:
        self.reload_weights(weights_path=path)
        model = self.model_runner.get_model()
        if getattr(self.model_config.hf_config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
            head = model.lm_head.tie_weights(model.model.embed_tokens)
            head.quant_method.process_weights_after_loading(head)


def engine_kwargs(op: OnPolicyConfig, model_dir: str, max_seq_len: int, seed: int) -> dict:
    """vLLM arguments of the sampler: the KV cache in bytes on CPU (``cluster.kv_cache``), eager, safetensors."""
    kwargs = {"max_model_len": max_seq_len, "enforce_eager": True, "load_format": "safetensors", "seed": seed,
              "max_num_seqs": 64, "worker_extension_cls": f"{__name__}.WeightRefresh"}
    if op.num_gpus == 0 or op.kv_cache_gib is not None:
        kv = resolve_kv_cache(op.kv_cache_gib, model_dir, max_seq_len, kwargs["max_num_seqs"])
        kwargs["kv_cache_memory_bytes"] = kv.bytes
    return kwargs | op.engine_kwargs


class StudentSampler:
    """The actor: ``generate`` continuations of token-id prompts, ``reload`` weights from a location."""

    def __init__(self, model: str, kwargs: dict):
        from vllm import LLM

        self.llm = LLM(model=localize(model), **kwargs)
        self.step = 0  # the trainer step whose weights the engine holds

    def generate(self, prompts: list[list[int]], budgets: list[int], temperature: float) -> tuple[list[list[int]], int]:
        """Continuations (eos included when sampled) and the step of the weights that made them."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(max_tokens=b, temperature=temperature, detokenize=False) for b in budgets]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], self.step

    def reload(self, location: str, step: int) -> float:
        """Load the weights written at ``location`` in place; returns the seconds it took."""
        started = time.perf_counter()
        self.llm.collective_rpc("refresh_weights", args=(localize(location),))
        self.llm.reset_prefix_cache()
        self.step = step
        return time.perf_counter() - started


def actor_name(run_name: str) -> str:
    return f"raystill-sampler-{run_name}"


def start(op: OnPolicyConfig, student: str, run_name: str, max_seq_len: int, seed: int):
    """The run's sampler actor on the student's initial weights (the caller kills it after the run)."""
    import ray

    local = localize(student)
    actor = ray.remote(StudentSampler).options(
        name=actor_name(run_name), num_cpus=op.num_cpus, num_gpus=op.num_gpus, max_restarts=1,
    ).remote(student, engine_kwargs(op, local, max_seq_len, seed))
    ray.get(actor.__ray_ready__.remote())
    return actor


class SamplerLink:
    """A worker's side: roll out an on-policy micro-batch, refresh the sampler's weights."""

    def __init__(self, name: str, op: OnPolicyConfig, score_collate, max_seq_len: int, cross=None):
        import ray

        self.actor = ray.get_actor(name)
        self.op, self.score_collate, self.max_seq_len, self.cross = op, score_collate, max_seq_len, cross
        self.sampler_step = 0
        self.stats = RolloutStats()

    def rollout(self, rows: OnPolicyRows, step: int) -> dict:
        """Sample the batch's continuations, have the teacher service score them, collate: training tensors."""
        import ray

        started = time.perf_counter()
        generated, self.sampler_step = ray.get(self.actor.generate.remote(
            rows.prompts, token_budgets(rows.prompts, self.op.max_new_tokens, self.max_seq_len), self.op.temperature))
        sampled_s = time.perf_counter() - started
        topk = self.score_collate.topk
        before, started = topk.scored_tokens, time.perf_counter()
        batch = self.score_collate(continuation_columns(rows, generated, self.cross))
        self.stats.add(sum(map(len, generated)), sampled_s, topk.scored_tokens - before,
                       time.perf_counter() - started, step - self.sampler_step)
        return batch

    def refresh(self, step: int, gather: Callable[[], dict | None], publish: Callable[[dict, str], None],
                location: str, rank: int, world: int) -> dict:
        """Gather (every rank), write and reload (rank 0), then a barrier: no rank samples stale weights."""
        import ray

        started = time.perf_counter()
        weights = gather()
        timings = {}
        if rank == 0:
            written = time.perf_counter()
            publish(weights, location)
            timings["sampler_write_s"] = time.perf_counter() - written
            timings["sampler_reload_s"] = ray.get(self.actor.reload.remote(location, step))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        self.sampler_step = step
        timings["sampler_sync_s"] = time.perf_counter() - started
        return timings

    def step_row(self) -> dict:
        """This step's on-policy columns; the counters start over for the next step."""
        row = self.stats.row()
        self.stats = RolloutStats()
        return row
