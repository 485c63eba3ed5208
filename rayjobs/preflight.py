"""Preflight: every reference a command will use is checked before Ray or any engine starts.

Models (local, s3://, hub id, demo:) must hold a config and a tokenizer; inputs must exist and
their first rows must fit the column mapping; outputs must be writable and not another config's.
All problems are reported at once, one line each (``<file>: <field>: <what is wrong> (<found>)``),
as a ``PreflightFailed`` (exit 2); what was learned about the models is printed in a few lines.
"""

from __future__ import annotations

from cluster.errors import UserError
from cluster.model_refs import ModelFacts, check_model
from cluster.storage import follow_release, join
from rayjobs.config import PipelineConfig
from rayjobs.refs import resolve_ref

COMMANDS = ("generate", "distill", "serve", "teacher", "run")


class PreflightFailed(UserError):
    """One or more references are wrong; the message has one line per problem."""


def _models(cfg: PipelineConfig, command: str) -> dict[str, str]:
    """Field path -> model reference, for the models ``command`` will load."""
    d = cfg.distillation
    models = {}
    if command in ("generate", "run"):
        models["generation.teacher"] = cfg.generation.teacher
        models["distillation.student"] = d.student  # generation tokenizes for the student
    if command in ("distill", "run"):
        models["distillation.student"] = d.student
        if d.online_teacher:
            models["distillation.teacher.model"] = d.teacher.model
    if command == "serve" or (command == "run" and cfg.serving.model != join(d.output, "merged")):
        models["serving.model"] = cfg.serving.model
    if command == "teacher":
        models["teacher_service.model"] = cfg.teacher_service.model
    return models


def _data_problems(cfg: PipelineConfig, command: str) -> dict[str, list[str]]:
    from datasets_pipeline.preflight import check_input, check_output
    from datasets_pipeline.shards import ShardStore
    from rayjobs.generate import generation_digest

    problems: dict[str, list[str]] = {}
    if command in ("generate", "run"):
        gen = cfg.generation
        problems["generation.input.path"] = check_input(gen.input, resolve_ref(gen.input.path))
        problems["generation.output"] = check_output(gen.output, generation_digest(cfg))
    if command == "distill":
        data = resolve_ref(cfg.distillation.data)
        if not ShardStore(data).sample_files():
            problems["distillation.data"] = [f"no committed shards in {data} (run raystill generate first)"]
    return problems


def _summary(facts: dict[str, ModelFacts]) -> list[str]:
    lines = []
    for field_path, f in facts.items():
        if f.facts:
            x = f.facts
            lines.append(f"preflight: {field_path}: {x['architecture']}, vocab {x['vocab_size']}, context "
                         f"{x['context']}, chat template {'yes' if x['chat_template'] else 'no'}")
    return lines


def run_preflight(cfg: PipelineConfig, config_path: str, command: str, log=print) -> None:
    """Raise ``PreflightFailed`` naming every problem; otherwise print what the models are."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    facts = {f: check_model(follow_release(resolve_ref(ref))) for f, ref in _models(cfg, command).items() if ref}
    problems = {f: m.problems for f, m in facts.items()}
    problems.update(_data_problems(cfg, command))
    lines = [f"{config_path}: {f}: {p}" for f, ps in problems.items() for p in ps]
    if lines:
        raise PreflightFailed("\n".join(lines))
    for line in _summary(facts):
        log(line)
