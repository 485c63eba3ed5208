"""Generation stage config: read prompts, ask the teacher, preprocess for the student."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.kv_cache import EngineMemory
from cluster.config import StrictModel
from cluster.storage import Location
from datasets_pipeline.answers import CHECKERS



class InputConfig(StrictModel):
    """Where prompts come from and which fields hold what."""

    path: Location = Field(description="JSONL file/dir, Parquet file/dir or a `datasets` save_to_disk dir; local or s3://.")
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = Field("auto", description="Source format; 'auto' guesses from the path.")
    prompt_field: str | None = Field(None, description="Field holding a plain-text prompt.")
    messages_field: str | None = Field("messages", description="Field holding chat `messages` (list of {role, content}).")
    system_field: str | None = Field(None, description="Optional field holding a system prompt.")
    answer_field: str | None = Field("answer", description="Optional field holding the reference answer.")
    id_field: str | None = Field("id", description="Optional stable row id; a content hash is used when absent.")
    response_field: str | None = Field(
        None, description="Field holding the teacher's response to the row's prompt (existing R1 traces): each row "
        "is then one teacher sample, no engine generates, and parsing, verification, filters and student "
        "tokenization apply as to generated samples. Rows without it, or with an empty one, are rejects.")
    max_prompt_chars: int = Field(8000, ge=1, description="Longer prompts are rejected (with the reason) rather than sent.")
    limit: int | None = Field(None, ge=1, description="Read at most this many rows (smoke runs).")

    @model_validator(mode="after")
    def _one_prompt_source(self):
        if not self.prompt_field and not self.messages_field:
            raise ValueError("set prompt_field or messages_field")
        return self


class SamplingConfig(StrictModel):
    n: int = Field(1, ge=1, le=64, description="Samples per prompt.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="Teacher sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest token set with this mass.")
    max_new_tokens: int = Field(256, ge=1, description="Teacher tokens per sample; longer ones count as truncated.")
    seed: int = Field(0, description="vLLM engine seed (per engine, not per request: vLLM CPU rejects those).")
    logprobs_topk: int = Field(0, ge=0, le=64, description="Teacher top-k logprobs stored per generated token (0 = off).")


class EngineConfig(EngineMemory):
    """The vLLM actor pool. CPU vs GPU is only this block."""

    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="Engine hardware; picks bundles and KV sizing.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type on GPU clusters, e.g. 'A10G'.")
    tensor_parallel_size: int = Field(1, ge=1, description="Devices (GPU) or CPU bundles one engine spans.")
    min_replicas: int = Field(1, ge=1, description="Engine actors kept alive.")
    max_replicas: int = Field(1, ge=1, description="Engine actors the pool may scale to.")
    batch_size: int = Field(64, ge=1, description="Rows per engine batch.")
    max_model_len: int | None = Field(None, ge=16, description="Engine context (prompt + new tokens); default: the model's.")
    enforce_eager: bool = Field(True, description="Skip graph capture/compilation (minutes at start on CPU, no gain on small models).")

    @model_validator(mode="after")
    def _replicas(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class PreprocessConfig(StrictModel):
    reasoning: Literal["keep", "strip"] = Field("keep", description="Keep the <think> trace in the training target or strip it.")
    checker: str = Field("numeric", description="Answer checker name: 'exact' or 'numeric'.")
    keep: Literal["all", "verified", "best_of_n"] = Field(
        "verified",
        description="Rejection sampling policy for the train split; val prompts keep every sample, right or "
                    "wrong, so held-out EM and teacher agreement cover all of them.",
    )
    drop_truncated: bool = Field(True, description="Set aside samples that hit max_new_tokens (counted as 'truncated').")
    dedupe: bool = Field(True, description="Set aside repeated (prompt, completion) pairs (counted as 'duplicate').")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of prompts held out as 'val' (by prompt, all samples).")
    split_seed: int = Field(0, description="Seed of the deterministic per-prompt train/val assignment.")
    redact_pii: bool = Field(
        False,
        description="Replace e-mail addresses, phone numbers, ID-card and card numbers and IP addresses in the "
                    "input messages (and in input rejects' details) with tags such as [EMAIL] before prompts "
                    "are rendered (cluster/pii.py); for inputs such as a served request log.",
    )

    @field_validator("checker")
    @classmethod
    def _known_checker(cls, value: str) -> str:
        """A misspelt checker would otherwise fail inside the engine's actor, after the engine started."""
        if value not in CHECKERS:
            raise ValueError(f"unknown checker {value!r}; known: {', '.join(sorted(CHECKERS))}")
        return value


class GenerationConfig(StrictModel):
    """Teacher generation through a vLLM actor pool in Ray Data, streamed into student preprocessing."""

    teacher: str = Field(description="Teacher model: local dir, s3:// URI or 'demo:teacher'.")
    input: InputConfig
    output: Location = Field(description="Where Parquet shards and the manifest go.")
    shard_rows: int = Field(2000, ge=1, description="Rows per committed shard; a resumed run redoes at most one shard.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    student_tokenizer: str | None = Field(None, description="Student tokenizer; defaults to distillation.student.")
    student_max_len: int | None = Field(None, ge=16, description="Student context; defaults to distillation.max_seq_len.")
    score_supplied: bool = Field(
        False, description="With input.response_field: run the teacher over prompt + supplied response (vLLM prompt "
        "logprobs, one forward pass, no sampling) and store its top sampling.logprobs_topk per response token, "
        "as generation does, so logit KD can use supplied traces. Off: no engine starts and the shards carry no "
        "teacher logprobs (loss.kind 'data' only).")

    @model_validator(mode="after")
    def _supplied_samples(self):
        """Supplied responses change what the sampling block can mean; say so instead of ignoring it."""
        supplied, k = self.input.response_field is not None, self.sampling.logprobs_topk
        if self.score_supplied and not supplied:
            raise ValueError("score_supplied needs input.response_field (the responses to score)")
        if self.score_supplied and not k:
            raise ValueError("score_supplied needs sampling.logprobs_topk > 0 (teacher top-k kept per response token)")
        if supplied and k and not self.score_supplied:
            raise ValueError("sampling.logprobs_topk with input.response_field stores nothing unless the teacher "
                             "scores the supplied responses: set score_supplied: true, or logprobs_topk: 0")
        if supplied and self.sampling.n != 1:
            raise ValueError("input.response_field: each row supplies one sample, so sampling.n must be 1")
        return self

    @property
    def samples_source(self) -> str:
        """'supplied' (the input's responses) or 'generated' (sampled from the teacher); in the manifest."""
        return "generated" if self.input.response_field is None else "supplied"

    @property
    def runs_engine(self) -> bool:
        """Whether a vLLM engine starts: to generate, or to score supplied responses."""
        return self.input.response_field is None or self.score_supplied
