"""The pipeline config: every stage's config composed, loaded from YAML with --set overrides.

Loading never raises a pydantic traceback at the user: every problem becomes a
``ConfigError`` whose lines each name the file, the field path and what is expected.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from cluster.config import ClusterConfig, StrictModel
from cluster.errors import ConfigError
from cluster.storage import Location, join
from datasets_pipeline.config import GenerationConfig
from rayjobs.distillation.config import SUPPLIED_UNSCORED, DistillationConfig
from service.config import ServingConfig, TeacherServiceConfig


class PipelineConfig(StrictModel):
    """generate -> distill -> merge -> evaluate -> serve, one file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name; artifacts go to runs_root/name.")
    runs_root: Location = Field("runs", description="Parent of every run directory; local or s3://.")
    trust_remote_code: bool = Field(
        False, description="Allow models whose repository ships Python code (custom architectures) to run it. "
        "Off: no stage runs it, and serving.engine_kwargs may not turn it on.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    generation: GenerationConfig
    distillation: DistillationConfig
    serving: ServingConfig = Field(default_factory=ServingConfig)
    teacher_service: TeacherServiceConfig = Field(
        default_factory=TeacherServiceConfig,
        description="The teacher scoring service (raystill teacher serve); its model defaults to generation.teacher.")

    @model_validator(mode="after")
    def _link_stages(self):
        """Fill cross-stage defaults so each stage config is complete on its own."""
        if self.generation.student_tokenizer is None:
            self.generation.student_tokenizer = self.distillation.student
        if self.generation.student_max_len is None:
            self.generation.student_max_len = self.distillation.max_seq_len
        if self.distillation.teacher.model is None:
            self.distillation.teacher.model = self.generation.teacher
        if self.distillation.data is None:
            self.distillation.data = self.generation.output
        if self.serving.model is None:
            self.serving.model = join(self.distillation.output, "merged")
        supplied_unscored = self.generation.samples_source == "supplied" and not self.generation.score_supplied
        d = self.distillation
        if supplied_unscored and d.data == self.generation.output and d.loss.kind == "logit" and not (d.online_teacher or d.service_teacher):
            raise ValueError(SUPPLIED_UNSCORED)
        if self.teacher_service.model is None:
            self.teacher_service.model = self.generation.teacher
        ref = self.distillation.teacher.service
        if self.distillation.service_teacher and ref.url is None:
            ref.url = self.teacher_service.local_url()
        if ref.api_key_env is None and ref.api_key_file is None:
            ref.api_key_env, ref.api_key_file = self.teacher_service.api_key_env, self.teacher_service.api_key_file
        for endpoint in (self.serving, self.teacher_service):
            if self.trust_remote_code:
                endpoint.trust_remote_code = True
            elif endpoint.trust_remote_code:
                raise ValueError(f"{endpoint.section}.trust_remote_code needs trust_remote_code: true at the top of "
                                 "the config")
        return self

    @property
    def run_dir(self) -> str:
        return join(self.runs_root, self.name)

    def digest(self, exclude: tuple[str, ...] = ()) -> str:
        """Short hash of the resolved config, recorded in manifests to tie outputs to inputs.

        ``exclude``: top-level sections the output does not depend on (a trained student does not
        depend on how it is served), so changing them does not redo the stage.
        """
        blob = json.dumps(self.model_dump(mode="json", exclude=set(exclude)), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# What a distillation run's output depends on: everything but serving.
DISTILL_DIGEST_EXCLUDE = ("serving", "teacher_service")


def _parse_value(raw: str) -> Any:
    """Override values are YAML scalars/flow collections: '3', 'true', 'null', '[a, b]'."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a raw config dict (before validation)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected PATH=VALUE, e.g. distillation.optim.lr=1e-4")
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {key}: '{where}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see `raystill config show` for valid keys)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        suffix = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {path}: {msg}{suffix}")
    return "\n".join(lines)


ENV_PREFIX = "env:"


def read_yaml(path: str | Path) -> dict:
    """Read a config file, or ``env:VAR`` (how `raystill submit` ships a resolved config to a job)."""
    if str(path).startswith(ENV_PREFIX):
        text = os.environ.get(str(path)[len(ENV_PREFIX):])
        if text is None:
            raise ConfigError(f"{path}: environment variable not set")
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        text = p.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(str(path), e)) from None


def leaf_fields(model: type[BaseModel] = None, prefix: str = "") -> list[tuple[str, str | None]]:
    """``(path, description)`` of every leaf field of the pipeline config, in declaration order.

    A field whose type is (or may be) a config section is walked into; everything else is a leaf.
    """
    model = model or PipelineConfig
    out = []
    for name, field in model.model_fields.items():
        sections = [t for t in (field.annotation, *typing.get_args(field.annotation))
                    if isinstance(t, type) and issubclass(t, BaseModel)]
        if sections:
            out += leaf_fields(sections[0], f"{prefix}{name}.")
        else:
            out.append((prefix + name, field.description))
    return out


def explain(cfg: PipelineConfig) -> str:
    """Every leaf field as ``path: value`` followed by its description (``raystill config show --explain``)."""
    values = cfg.model_dump(mode="json")
    lines = []
    for path, description in leaf_fields():
        value = values
        for key in path.split("."):
            value = value[key] if isinstance(value, dict) else None
        lines.append(f"{path}: {json.dumps(value)}\n    {description}")
    return "\n".join(lines)
