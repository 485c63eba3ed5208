"""A student derived from the teacher vs a random one of the same shape, on a small demo world.

Builds (or reuses) a demo world whose 4-block teacher is trained for ``--teacher-steps``, derives a
2-block student from it (``rayjobs.distillation.student_init``: blocks 0 and 2, the teacher's
embeddings, norms and head), and builds a random student of exactly that shape. Both are then
trained side by side on the same stream of the task's problems (plain SFT, ``--steps`` steps, same
seed and learning rate) and measured on the world's held-out prompts before and after: token-mean
cross-entropy of the reference traces and greedy exact match. Ends with one JSON line:
``derived_ce_0``, ``random_ce_0``, ``derived_ce_n``, ``random_ce_n``, ``derived_em_0``,
``random_em_0``, ``derived_em_n``, ``random_em_n``, ``teacher_ce``, ``teacher_em``,
``random_over_derived_ce_0`` and ``random_over_derived_ce_n``.
Usage: python bench/student_init.py [--teacher-steps 300] [--steps 100] [--out runs/student-init]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _world(out: Path, teacher_steps: int):
    from rayjobs.demo.world import DemoRecipe, ModelShape, prepare

    recipe = DemoRecipe.tiny().model_copy(update={
        "teacher": ModelShape(hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=1, intermediate_size=128,
                              max_position_embeddings=256),
        "n_heldout": 64, "steps": teacher_steps, "batch_size": 16, "warmup_steps": 20, "eval_every": 100,
        "eval_sample": 16})
    return prepare(str(out / "world"), recipe, progress=lambda m: print(f"world: {m}", flush=True))


def _measure(model, tokenizer, records) -> tuple[float, float]:
    from rayjobs.demo.evaluate import exact_match_records, heldout_ce

    return heldout_ce(model, tokenizer, records), exact_match_records(model, tokenizer, records)["em"]


def _train(model, tokenizer, records, steps: int, seed: int) -> None:
    """Plain SFT on fresh problems (never a held-out one), the same stream for both students."""
    import re

    from rayjobs.demo.task import Problem, TaskSpec, assistant_content, prompt_messages, training_stream
    from rayjobs.demo.train_lm import SFTSettings, encode_example, train_causal_lm

    spec = TaskSpec(3, 3)
    heldout = [Problem(*map(int, re.search(r"(\d+) \+ (\d+)", r["messages"][-1]["content"]).groups()))
               for r in records]
    examples = (encode_example(tokenizer, prompt_messages(p, spec), assistant_content(p))
                for p in training_stream(spec, seed + 1, exclude=heldout))
    train_causal_lm(model, tokenizer, examples, SFTSettings(steps=steps, batch_size=16, lr=3e-3, warmup_steps=10,
                                                            log_every=max(1, steps // 5)),
                    progress=lambda m: print(f"  {m}", flush=True))


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayjobs.demo.task import read_prompts_jsonl
    from rayjobs.distillation.student_init import init_student

    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=100, help="SFT steps for each student")
    ap.add_argument("--out", default="runs/student-init")
    args = ap.parse_args()
    out = ROOT / args.out
    world = _world(out, args.teacher_steps)
    tokenizer = AutoTokenizer.from_pretrained(world.teacher)
    records = read_prompts_jsonl(world.heldout_jsonl)
    teacher = AutoModelForCausalLM.from_pretrained(world.teacher, dtype=torch.float32)
    figures = dict(zip(("teacher_ce", "teacher_em"), _measure(teacher, tokenizer, records), strict=True))
    init_student(str(world.teacher), out / "derived", every_nth=2)
    models = {"derived": AutoModelForCausalLM.from_pretrained(out / "derived", dtype=torch.float32)}
    torch.manual_seed(0)
    models["random"] = AutoModelForCausalLM.from_config(models["derived"].config)
    for name, model in models.items():
        figures[f"{name}_ce_0"], figures[f"{name}_em_0"] = _measure(model, tokenizer, records)
        print(f"{name} at step 0: CE {figures[f'{name}_ce_0']:.4f}, EM {figures[f'{name}_em_0']:.3f}", flush=True)
        _train(model, tokenizer, records, args.steps, seed=0)
        figures[f"{name}_ce_n"], figures[f"{name}_em_n"] = _measure(model, tokenizer, records)
        print(f"{name} after {args.steps} steps: CE {figures[f'{name}_ce_n']:.4f}, EM {figures[f'{name}_em_n']:.3f}",
              flush=True)
    for at in ("0", "n"):
        figures[f"random_over_derived_ce_{at}"] = figures[f"random_ce_{at}"] / figures[f"derived_ce_{at}"]
    print(json.dumps({"steps": args.steps, "teacher_steps": args.teacher_steps, "heldout": len(records),
                      **{k: round(v, 4) for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
