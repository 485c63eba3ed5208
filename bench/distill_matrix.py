"""Distillation lift on the demo world: LoRA and full fine-tuning, ZeRO-2 and ZeRO-3, same data.

Each variant is ``python -m rayjobs.distill`` on ``examples/configs/demo.yaml`` with overrides, in
its own process and its own local Ray, reading the same generated shards (generated first if
missing). Prints EM and minutes per variant and ends with one JSON line holding, per variant,
``<variant>_em_over_teacher`` (student EM after / teacher EM on the same held-out prompts; the
issue's goal is >= 0.9 from an untrained student at EM 0.0) and ``<variant>_minutes``.
Usage: python bench/distill_matrix.py [--only full-z2,lora-z3] [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "examples/configs/demo.yaml"
OUT = "runs/matrix"
LORA = ["distillation.lora.enabled=true", "distillation.lora.r=32", "distillation.lora.alpha=64",
        "distillation.lora.modules_to_save=[norm,embed_tokens]", "distillation.optim.lr=1e-3"]
VARIANTS = {
    "full-z2": ["distillation.deepspeed.zero_stage=2"],
    "full-z3": ["distillation.deepspeed.zero_stage=3"],
    "lora-z2": ["distillation.deepspeed.zero_stage=2", *LORA],
    "lora-z3": ["distillation.deepspeed.zero_stage=3", *LORA],
}


def run_job(module: str, overrides: list[str], log: Path, config: str = CONFIG) -> float:
    """``python -m module --config config --set ...`` in its own process and local Ray; wall seconds."""
    args = [sys.executable, "-m", module, "--config", config]
    for o in overrides:
        args += ["--set", o]
    start = time.perf_counter()
    with log.open("wb") as out:  # a file, not a pipe: vLLM and Ray log a lot
        rc = subprocess.run(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_ADDRESS": ""}).returncode
    if rc:
        raise SystemExit(f"{module} {overrides} failed ({rc}); see {log}")
    return time.perf_counter() - start


def _teacher_em(common: list[str]) -> float:
    from rayjobs import distill
    from rayjobs.config import load_config
    from rayjobs.refs import resolve_ref

    cfg = load_config(str(ROOT / CONFIG), common)
    return distill.evaluate(cfg, resolve_ref(cfg.generation.teacher))["em"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--epochs", type=float, default=None, help="override distillation.optim.epochs")
    args = ap.parse_args()
    logs = ROOT / OUT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = [f"distillation.optim.epochs={args.epochs}"] if args.epochs else []
    gen_s = run_job("rayjobs.generate", common, logs / "generate.log")
    print(f"generation ready ({gen_s / 60:.1f} min, skipped when complete)")
    teacher = _teacher_em(common)
    figures: dict[str, float] = {"teacher_em": teacher}
    print(f"teacher EM {teacher:.3f}")
    for name in args.only.split(","):
        out = f"{OUT}/{name}"
        wall = run_job("rayjobs.distill", [*common, *VARIANTS[name], f"distillation.output={out}"], logs / f"{name}.log")
        summary = json.loads((ROOT / out / "summary.json").read_text())
        em = summary["eval"]["em"]
        figures[f"{name}_em_over_teacher"] = round(em / teacher, 3) if teacher else 0.0
        figures[f"{name}_minutes"] = round(wall / 60, 2)
        print(f"{name}: {summary['steps']} steps, student EM {em:.3f} ({em / teacher:.3f} x teacher), "
              f"{wall / 60:.1f} min (job incl. Ray start, merge and eval)", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
