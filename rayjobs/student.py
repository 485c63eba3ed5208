"""``raystill student init``: derive the student from the teacher (``distillation.student_init``).

The work is ``rayjobs.distillation.student_init``; this resolves which teacher and where the student
goes. ``generate``, ``distill`` and ``run`` call ``ensure`` before their preflight: a config whose
student is derived builds it once, the first time one of them needs it (the generation stage
tokenizes for it, distillation trains it).
"""

from __future__ import annotations

import json
from pathlib import Path

from cluster.errors import ConfigError
from cluster.storage import is_s3, localize
from rayjobs.config import PipelineConfig
from rayjobs.refs import resolve_ref


def teacher_of(cfg: PipelineConfig) -> str:
    """The model the student is derived from: ``student_init.teacher``, the online teacher's, else the generating one."""
    d = cfg.distillation
    return resolve_ref(d.student_init.teacher or d.teacher.model or cfg.generation.teacher)


def init(cfg: PipelineConfig, log=print) -> dict:
    """Build (or rebuild) the derived student; returns ``student_init.init_student``'s record."""
    from rayjobs.distillation.student_init import init_student

    si = cfg.distillation.student_init
    if si is None:
        raise ConfigError("raystill student init needs a distillation.student_init section (teacher, output, "
                          "every_nth or layers, mlp_keep)")
    if is_s3(si.output):
        raise ConfigError(f"distillation.student_init.output must be a local directory ({si.output!r}); "
                          "upload the built student and point distillation.student at it")
    teacher = teacher_of(cfg)
    report = init_student(localize(teacher), si.output, every_nth=si.every_nth, layers=si.layers,
                          mlp_keep=si.mlp_keep)
    log(f"student init: {report['output']}: teacher blocks {report['layers']} of {report['teacher_layers']}, "
        f"MLP width {report['intermediate_size']}, {report['parameters']:,} parameters "
        f"({report['parameters'] / report['teacher_parameters']:.0%} of the teacher's)")
    return report


def ensure(cfg: PipelineConfig, log=print) -> None:
    """Build the derived student unless its directory already holds a model."""
    si = cfg.distillation.student_init
    if si is not None and not (Path(si.output) / "config.json").exists():
        init(cfg, log)


def main_init(cfg: PipelineConfig) -> int:
    print(json.dumps(init(cfg)))
    return 0
