"""Job: distillation (``python -m rayjobs.distill --config FILE``).

Wires the stage: generated shards -> Ray Data -> ``TorchTrainer`` (``rayjobs.distillation``: ``engine``
on the driver, ``worker`` with DeepSpeed in every worker) -> merged HF student (a new version) ->
held-out eval + gate -> only a passing version is released to ``merged/`` -> curves, ``summary.json``.

Layout under ``distillation.output`` (local or s3://)::

    checkpoints/<run name>/   Ray Train run: DeepSpeed checkpoints, rerun with the same name resumes
    versions/<run>-<time>/    each training's student, LoRA merged in: safetensors + tokenizer + chat template
    merged/RELEASE.json       what serving serves: the last version that passed the gate (one atomic write)
    curves.jsonl, curves.png  one row per optimizer step (loss terms, LR, tokens/s)
    eval.json                 held-out report (rayjobs.distillation.evaluate) with the gate verdict
    summary.json              what run() returns
"""

from __future__ import annotations

import json
import sys
import time

from cluster.connect import ray_init, require_shared
from cluster.errors import ConfigError
from cluster.model_refs import read_model_file
from cluster.storage import follow_release, join, release, write_json
from datasets_pipeline.diagnostics import one_hot_warning, summarize
from rayjobs.config import DISTILL_DIGEST_EXCLUDE, PipelineConfig
from rayjobs.distillation import engine, plan
from rayjobs.distillation.checkpoints import check_layout, checkpoint_layout
from rayjobs.distillation.config import DistillationConfig
from rayjobs.entry import run_job
from rayjobs.refs import resolve_ref


def model_config(location: str) -> dict:
    """A model's ``config.json`` (local, s3:// or hub id), without fetching the weights."""
    return json.loads(read_model_file(location, "config.json"))


def data_stats(data: str, context_limit: int) -> dict[str, int]:
    """Rows per split, rows carrying teacher top-k at student positions, rows over the context.

    ``with_teacher_topk`` counts same-tokenizer rows (``teacher_offset >= 0``) and cross-tokenizer
    rows with an alignment; ``xtok`` the latter; ``over_context`` the rows (any split) longer than
    ``context_limit`` student tokens. Read from the manifest's statistics, or summed from the
    progress files when there is no manifest (or one from before statistics): never from the rows.
    """
    from datasets_pipeline.shards import ShardStore
    from datasets_pipeline.stats import rows_over, total

    store = ShardStore(data)
    stats = (store.read_manifest() or {}).get("stats")
    if stats is None:
        stats = store.committed_stats()
    return {
        "train": total(stats, "rows", ["train"]),
        "val": total(stats, "rows", ["val"]),
        "with_teacher_topk": total(stats, "with_teacher_topk"),
        "xtok": total(stats, "xtok"),
        "over_context": rows_over(stats, context_limit),
        "over_context_train": rows_over(stats, context_limit, ["train"]),
    }


def _tokenizer_hash(path: str) -> str:
    """Content hash of the tokenizer at ``path`` (local directory, hub id, or s3:// through the
    node's cache, tokenizer files only)."""
    from transformers import AutoTokenizer

    from cluster.storage import localize
    from datasets_pipeline.vocab_cache import tokenizer_hash

    return tokenizer_hash(AutoTokenizer.from_pretrained(localize(path, tokenizer_only=True)))


def check_shards_tokenizer(data: str, student: str, teacher_tokenizer: str | None = None) -> None:
    """``plan.check_student_tokenizer`` against the shards' manifest, before Ray Train starts.

    Loads the student's tokenizer on the driver only when the manifest records one. With
    ``teacher_tokenizer`` (``plan.stored_teacher_tokenizer``) also checks that the tokenizer there
    still hashes as recorded: the workers map the shards' teacher ids through it.
    """
    from datasets_pipeline.shards import ShardStore

    records = (ShardStore(data).read_manifest() or {}).get("tokenizers") or {}
    if records.get("student"):
        plan.check_student_tokenizer(records["student"], student, _tokenizer_hash(student), data)
    if teacher_tokenizer and _tokenizer_hash(teacher_tokenizer) != records["teacher"].get("sha256"):
        raise ConfigError(
            f"the teacher tokenizer at {teacher_tokenizer} no longer hashes as the shards at {data} record "
            f"(sha256 {str(records['teacher'].get('sha256'))[:16]}): their top-k ids cannot be mapped to "
            "student ids through it; restore that tokenizer or regenerate the shards")


def teacher_warning(d: DistillationConfig, manifest: dict | None) -> str | None:
    """Logit KD over a teacher whose stored top-k are >= 99% near one-hot: a warning, never a refusal
    (it trains, but as data distillation would). From the manifest's ``teacher_diagnostics``, or
    its summed statistics for manifests written before them."""
    if d.loss.kind != "logit" or not manifest:
        return None
    return one_hot_warning(manifest.get("teacher_diagnostics") or summarize(manifest.get("stats") or {}))


def _log_plan(log, d, step_plan, stats: dict[str, int], context: dict) -> None:
    log(f"distill: {step_plan.rows} train rows, {stats['val']} val rows; {step_plan.total_steps} optimizer steps "
        f"({step_plan.micro_batches_per_epoch} micro-batches per worker-epoch, {d.scaling.num_workers} workers)")
    if context["over_limit"]:
        log(f"distill: {context['over_limit']} rows are longer than the student's {context['limit']} positions: "
            f"{'dropped' if d.context_policy == 'drop' else 'truncated'} (distillation.context_policy)")
    if d.loss.kind == "logit" and d.teacher.source == "stored" and stats["with_teacher_topk"] < stats["train"] + stats["val"]:
        log(f"distill: warning: only {stats['with_teacher_topk']} of {stats['train'] + stats['val']} rows carry "
            "aligned teacher top-k; the others train on cross-entropy alone")


def train(cfg: PipelineConfig, log=print) -> dict:
    """Plan, check, and run the TorchTrainer to completion (or resume it); returns the trainer state.

    Starts or joins Ray itself (``ray_init`` is idempotent), so the bench and tests can call it.
    """
    from datasets_pipeline.shards import ShardStore

    d = cfg.distillation
    data = engine.absolute(resolve_ref(d.data))
    store = ShardStore(data)
    manifest = store.read_manifest()
    plan.check_teacher_signal(d, manifest)
    warning = teacher_warning(d, manifest)
    if warning:
        log(f"distill: warning: {warning}")
    student = engine.absolute(follow_release(resolve_ref(d.student)))  # a released run's student (two-phase recipes)
    teacher = engine.absolute(resolve_ref(d.teacher.model)) if d.online_teacher or d.service_teacher else None
    ray_init(cfg.cluster)
    require_shared({"distillation.output": d.output, "distillation.data": data})
    student_config = model_config(student)
    limit = plan.context_limit(d, student_config)
    stats = data_stats(data, limit)
    plan.check_supported(d, stats)
    teacher_tokenizer = plan.stored_teacher_tokenizer(d, manifest, stats, data)
    check_shards_tokenizer(data, student, teacher_tokenizer)
    if d.online_teacher:
        plan.check_models(d, student_config, model_config(teacher))
    context = plan.context_report(d, limit, stats)
    dropped = stats["over_context_train"] if d.context_policy == "drop" else 0
    step_plan = plan.plan_steps(stats["train"] - dropped, d.optim, d.scaling.num_workers)
    _log_plan(log, d, step_plan, stats, context)
    storage = join(engine.absolute(d.output), "checkpoints")
    check_layout(join(storage, cfg.name), checkpoint_layout(d), cfg.name)
    loop = engine.build_loop_config(d, cfg.name, student=student, teacher=teacher, total_steps=step_plan.total_steps,
                                    teacher_tokenizer=teacher_tokenizer, storage=storage, has_val=stats["val"] > 0,
                                    max_seq_len=limit, em_sample=em_sample(cfg, data),
                                    steps_per_epoch=step_plan.steps_per_epoch)
    datasets = engine.build_datasets(store.sample_files(), store.fs, plan.training_columns(d), stats,
                                     drop_over=limit if dropped else None)
    state = engine.fit(d, cfg.name, loop, datasets, storage)
    return {**state, "total_steps": step_plan.total_steps, "rows": stats, "context": context,
            "teacher_warning": warning}


def em_sample(cfg: PipelineConfig, data: str) -> dict | None:
    """The held-out prompts for in-training exact match (``distillation.eval_em_samples``), as the
    workers' ``validation.EmSample``; the checker and budget are the held-out eval's."""
    d = cfg.distillation
    if not d.eval_em_samples:
        return None
    records = [{k: r[k] for k in ("messages", "reference", "answer")} for r in eval_records(data, d.eval_em_samples)]
    return {"records": records, "checker": d.eval.checker or cfg.generation.preprocess.checker,
            "max_new_tokens": d.eval.max_new_tokens or cfg.generation.sampling.max_new_tokens,
            "batch_size": d.eval.batch_size}


def eval_records(data: str, limit: int | None = None) -> list[dict]:
    """The held-out prompts: first sample of each val prompt in the committed shards."""
    from datasets_pipeline.shards import ShardStore
    from rayjobs.distillation.evaluate import EVAL_COLUMNS, select_eval_records

    return select_eval_records(ShardStore(data).read_samples(list(EVAL_COLUMNS)), limit)


def evaluate(cfg: PipelineConfig, merged: str) -> dict:
    """The held-out eval of ``merged`` on the generated val split, plus the gate."""
    records = eval_records(resolve_ref(cfg.distillation.data))
    return engine.evaluate_remote(cfg.distillation, merged, records,
                                  checker=cfg.generation.preprocess.checker,
                                  max_new_tokens=cfg.generation.sampling.max_new_tokens)


def run(cfg: PipelineConfig, log=print) -> dict:
    """Train (or resume), merge, evaluate, gate; writes and returns ``summary.json``'s dict.

    Keys: ``steps``/``total_steps``, ``tokens``, ``train_tokens_per_s`` (steady state),
    ``final_loss``, ``val`` (worker-side val loss), ``restarts`` (starts from a checkpoint, a
    rerun of a finished run included) and ``restored_from_steps``, ``merged``, ``checkpoint``,
    ``curves``, ``eval`` (headline metrics; the full report is ``eval_report``; ``student_em_after``
    and ``teacher_agreement`` repeat two of them at the top), ``context`` (samples longer than the
    student's positions and what ``context_policy`` did with them), ``gate``
    (``passed`` + per-threshold ``checks``), ``config_digest``, ``wall_s``. A failed gate is
    reported, not raised: the caller decides whether to deploy.
    """
    from rayjobs.distillation.curves import write_curves

    d = cfg.distillation
    plan.check_supported(d)
    started = time.perf_counter()
    output = engine.absolute(d.output)
    state = train(cfg, log)
    history = state["history"]
    curves = {"jsonl": join(output, "curves.jsonl"), "png": join(output, "curves.png")}
    write_curves(history, curves["jsonl"], curves["png"], title=f"{cfg.name}: distillation")
    merged = state["final"]["merged"]
    log(f"distill: trained {state['step']} steps, candidate student at {merged}; evaluating")
    report = evaluate(cfg, merged)
    eval_path = join(output, "eval.json")
    write_json(eval_path, report)
    served = join(output, "merged")
    if report["gate"]["passed"]:
        release(served, merged, {"run": cfg.name, "eval": eval_path, "gate": report["gate"]})
    summary = _summary(cfg, state, report, curves, served, eval_path) | {"wall_s": time.perf_counter() - started}
    write_json(join(output, "summary.json"), summary)
    verdict = "PASSED" if report["gate"]["passed"] else "FAILED"
    log(f"distill: eval em={report.get('em')} teacher_agreement={report.get('teacher_agreement')} "
        f"perplexity={report.get('perplexity')}; gate {verdict}"
        + (f"; {served} now serves it" if report["gate"]["passed"] else f"; {served} unchanged")
        + f"; summary at {join(output, 'summary.json')}")
    return summary


def _summary(cfg: PipelineConfig, state: dict, report: dict, curves: dict, served: str, eval_path: str) -> dict:
    from rayjobs.distillation.curves import steady_tokens_per_s

    final = state["final"]
    return {
        "run": cfg.name,
        "config_digest": cfg.digest(exclude=DISTILL_DIGEST_EXCLUDE),
        "steps": state["step"],
        "total_steps": state["total_steps"],
        "epochs_completed": state["epoch"],
        "rows": state["rows"],
        "tokens": state["tokens"],
        "train_tokens_per_s": steady_tokens_per_s(state["history"]),
        "final_loss": {k: final.get(k) for k in ("loss", "ce", "kd")},
        "val": {k: v for k, v in final.items() if k.startswith("val_")},
        "restarts": state["attempt"],
        "restored_from_steps": state["restored_from"],
        "merged": state["final"]["merged"],
        "merged_step": final.get("merged_step", state["step"]),
        "early_stopping": final.get("early_stopping"),
        "served": served,
        "released": report["gate"]["passed"],
        "checkpoint": state["checkpoint"],
        "curves": curves,
        "eval": {k: report.get(k) for k in ("n", "em", "token_f1", "teacher_agreement", "perplexity", "tokens_per_s")},
        "student_em_after": report.get("em"),
        "teacher_agreement": report.get("teacher_agreement"),
        "loss_kind": cfg.distillation.loss.kind,
        "context": state["context"],
        "teacher_warning": state.get("teacher_warning"),
        "eval_report": eval_path,
        "gate": report["gate"],
    }


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__.splitlines()[0], run, "distill", argv)


if __name__ == "__main__":
    sys.exit(main())
