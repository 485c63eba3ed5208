"""Job: teacher generation (``python -m rayjobs.generate --config FILE``)."""

from __future__ import annotations

import hashlib
import json
import sys

from cluster.connect import is_embedded, ray_init
from cluster.kv_cache import engine_failures_explained, preflight
from rayjobs.config import PipelineConfig
from rayjobs.entry import run_job
from rayjobs.refs import resolve_ref

KV_SETTING = "generation.engine.kv_cache_gib"


def generation_digest(cfg: PipelineConfig) -> str:
    """Generation outputs depend on the generation config and the record schema, not on later stages.

    The schema is part of it so that output written by an older release (other columns) is
    regenerated rather than handed to a trainer that expects the new columns.
    """
    from datasets_pipeline.records import SAMPLE_SCHEMA

    blob = json.dumps(cfg.generation.model_dump(mode="json"), sort_keys=True) + SAMPLE_SCHEMA.to_string()
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(cfg: PipelineConfig, log=print) -> dict:
    from datasets_pipeline.engine import kv_cache_size
    from datasets_pipeline.generate import run_generation

    gen = cfg.generation
    teacher = resolve_ref(gen.teacher)
    student = resolve_ref(gen.student_tokenizer)
    input_path = resolve_ref(gen.input.path)
    if is_embedded(cfg.cluster) and gen.runs_engine:
        preflight(kv_cache_size(gen, teacher), KV_SETTING, teacher, engines=gen.engine.min_replicas)
    ray_init(cfg.cluster)
    with engine_failures_explained(KV_SETTING):
        return run_generation(gen, teacher=teacher, student=student, input_path=input_path,
                              config_digest=generation_digest(cfg), log=log)


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, run, "generate", argv)


if __name__ == "__main__":
    sys.exit(main())
