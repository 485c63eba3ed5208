"""Cross-tokenizer logit KD vs data-only on the demo world, over several data orders.

Runs the committed pair ``examples/configs/demo-xtok-logit.yaml`` / ``demo-xtok-data.yaml`` (they
differ only in ``distillation.loss``; same shards, same 400 steps) once per ``distillation.seed``
(the seed changes only the order the training rows are read in), each in its own process and local
Ray. At 400 steps this student is in the middle of a sharp jump in EM, and the data order alone
moves one run's EM between 0.3 and 1.0, so a single pair says little; this compares them seed by
seed. Ends with one JSON line: ``logit_mean_em``, ``data_mean_em``, ``logit_minus_data_mean_em``,
``logit_wins``, ``ties``, ``data_wins`` (held-out EM on the val prompts), and both arms' mean teacher
agreement.
Usage: python bench/xtok_seeds.py [--seeds 10] [--first-seed 0] [--out runs/xtok-seeds] [--set KEY=VALUE ...]
(``--set`` applies to both arms and the generation, e.g. another teacher and its output directory.)
"""

from __future__ import annotations

import argparse
import json
import statistics

from distill_matrix import ROOT, run_job

ARMS = {"logit": "examples/configs/demo-xtok-logit.yaml", "data": "examples/configs/demo-xtok-data.yaml"}
OUT = "runs/xtok-seeds"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--out", default=OUT, help="where the runs and logs go (relative to the repository)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for generation and both arms (repeatable)")
    args = ap.parse_args()
    logs = ROOT / args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gen_s = run_job("rayjobs.generate", args.overrides, logs / "generate.log", config=ARMS["logit"])
    print(f"generation ready ({gen_s / 60:.1f} min, skipped when complete)")
    em: dict[str, list[float]] = {arm: [] for arm in ARMS}
    agreement: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for arm, config in ARMS.items():
            out = f"{args.out}/{arm}-s{seed}/distill"
            wall = run_job("rayjobs.distill", [*args.overrides, f"distillation.seed={seed}", f"distillation.output={out}",
                                               f"name=xtok-seeds-{arm}-s{seed}"], logs / f"{arm}-s{seed}.log", config)
            summary = json.loads((ROOT / out / "summary.json").read_text())
            em[arm].append(summary["student_em_after"])
            agreement[arm].append(summary["teacher_agreement"])
            print(f"seed {seed} {arm:5s}: EM {em[arm][-1]:.3f}, teacher agreement {agreement[arm][-1]:.3f} "
                  f"({wall:.0f} s)", flush=True)
    pairs = list(zip(em["logit"], em["data"]))
    figures = {
        "seeds": args.seeds,
        "logit_mean_em": round(statistics.mean(em["logit"]), 3),
        "data_mean_em": round(statistics.mean(em["data"]), 3),
        "logit_minus_data_mean_em": round(statistics.mean(a - b for a, b in pairs), 3),
        "logit_wins": sum(a > b for a, b in pairs),
        "ties": sum(a == b for a, b in pairs),
        "data_wins": sum(a < b for a, b in pairs),
        "logit_mean_teacher_agreement": round(statistics.mean(agreement["logit"]), 3),
        "data_mean_teacher_agreement": round(statistics.mean(agreement["data"]), 3),
    }
    print(f"logit EM {figures['logit_mean_em']:.3f} vs data {figures['data_mean_em']:.3f} (mean of {args.seeds}); "
          f"logit better on {figures['logit_wins']}, equal on {figures['ties']}, worse on {figures['data_wins']} seeds")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
