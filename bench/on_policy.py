"""Off-policy only vs off- + on-policy distillation from the teacher scoring service, over several seeds.

The two-phase recipe of ``examples/configs/demo-on-policy.yaml`` on the demo world: one short SFT
run on the teacher's traces (``loss.kind: data``, released, shared by every arm and seed), then per
seed two continuations of the same number of steps from that student, both with the teacher
service as their teacher: (a) off-policy only (``on_policy.fraction: 0``: the stored samples scored
by the service) and (b) the same plus on-policy batches (``fraction`` = ``--fraction``). The seed
changes the data order, the on-policy batch choice and the sampler's seed. Each job runs in its own
process and local Ray; the teacher service runs in another (``python -m rayjobs.teacher``), as a
shared service would.

Reports per arm the held-out EM and teacher agreement (the val prompts, greedy), the teacher tokens
scored and the wall time, then one JSON line: ``on_policy_mean_em``, ``off_policy_mean_em``,
``paired_diff_mean`` (on minus off, per seed), ``paired_diff_ci95`` (t interval over seeds),
``teacher_scored_tokens_per_s`` (median over on-policy steps of the scoring rate of the student's
samples), and both arms' mean teacher agreement and wall seconds.
``--tiny`` runs it all on the tests' tiny world instead (untrained models, seconds to build): the
plumbing and the costs, not a quality comparison (every EM is 0 there).
Usage: python bench/on_policy.py [--seeds 5] [--sft-steps 300] [--steps 100] [--fraction 0.5] [--tiny]
[--out runs/on-policy-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

from distill_matrix import ROOT, run_job

CONFIG = "examples/configs/demo-on-policy.yaml"
# Two-sided 95 % Student-t quantiles by degrees of freedom (seeds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def ci95(diffs: list[float]) -> list[float]:
    """The t interval of the mean paired difference (normal quantile beyond 11 seeds)."""
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return [mean, mean]
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return [round(mean - half, 4), round(mean + half, 4)]


def start_teacher(common: list[str], log) -> subprocess.Popen:
    """``raystill teacher serve`` in its own process and Ray, until it answers a score request."""
    from rayjobs.config import load_config
    from rayjobs.distillation.service_teacher import client_for

    client = client_for(load_config(str(ROOT / CONFIG), common).distillation.teacher.service)
    client.retries = 0
    args = [sys.executable, "-m", "rayjobs.teacher", "--config", CONFIG]
    for o in common:
        args += ["--set", o]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
    deadline = time.monotonic() + 900
    while True:
        try:
            client.score([[1, 2, 3]], [1], 1)
            return proc
        except Exception:  # noqa: BLE001 - not up yet: connection refused, 404 before the app is deployed
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_teacher(proc)
                raise SystemExit("the teacher service did not start; see its log") from None
            time.sleep(5)


def stop_teacher(proc: subprocess.Popen) -> None:
    """Ctrl-C, as `raystill teacher serve` expects (it shuts its Ray down); killed if that takes over a minute."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def arm_figures(out: str) -> dict:
    """EM, agreement, wall time and teacher scoring of one finished run."""
    summary = json.loads((ROOT / out / "summary.json").read_text())
    rows = [json.loads(line) for line in (ROOT / out / "curves.jsonl").read_text().splitlines()]
    rates = [r["scored_tokens_per_s"] for r in rows if r.get("on_policy_batches")]
    return {"em": summary["student_em_after"], "agreement": summary["teacher_agreement"], "wall_s": summary["wall_s"],
            "teacher_scored_tokens": rows[-1].get("teacher_scored_tokens", 0),
            "on_policy_batches": sum(r.get("on_policy_batches", 0) for r in rows), "scoring_rates": rates}


def run_seed(seed: int, args, common: list[str], sft: str, logs) -> dict:
    figures = {}
    for arm, fraction in (("off", 0.0), ("on", args.fraction)):
        out = f"{args.out}/{arm}-s{seed}/distill"
        wall = run_job("rayjobs.distill", [*common, f"distillation.student={sft}", f"distillation.seed={seed}",
                                           f"distillation.optim.max_steps={args.steps}", f"distillation.output={out}",
                                           f"distillation.on_policy.fraction={fraction}", f"name=onpol-{arm}-s{seed}"],
                       logs / f"{arm}-s{seed}.log", CONFIG)
        figures[arm] = arm_figures(out)
        f = figures[arm]
        print(f"seed {seed} {arm:3s}: EM {f['em']:.3f}, teacher agreement {f['agreement']:.3f}, "
              f"{f['on_policy_batches']} on-policy batches, {f['teacher_scored_tokens']} teacher tokens scored "
              f"({wall:.0f} s)", flush=True)
    return figures


def tiny_world(out: str) -> tuple[list[str], str]:
    """Config overrides pointing the ``demo:`` references at the tiny world (built once, cached), and its student."""
    from cluster.storage import cache_dir
    from rayjobs.demo.world import DemoRecipe, prepare

    world = prepare(os.path.join(cache_dir(), "bench-tiny-world"), DemoRecipe.tiny(), progress=lambda *a: None)
    return [f"generation.teacher={world.teacher}", f"generation.input.path={world.train_jsonl}",
            f"generation.student_tokenizer={world.student_same_tokenizer}",
            f"generation.output={out}/generated", f"distillation.data={out}/generated",
            "generation.preprocess.drop_truncated=false", "generation.preprocess.keep=all"], str(
        world.student_same_tokenizer)


def main() -> None:
    from cluster.ports import free_port

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sft-steps", type=int, default=300, help="phase 1: data-distillation steps (the shared start)")
    ap.add_argument("--steps", type=int, default=100, help="phase 2: steps of each arm")
    ap.add_argument("--fraction", type=float, default=0.5, help="on-policy arm's on_policy.fraction")
    ap.add_argument("--tiny", action="store_true", help="the tiny world: plumbing and costs, not quality")
    ap.add_argument("--out", default="runs/on-policy-bench")
    args = ap.parse_args()
    logs = ROOT / args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Every process of the run reads this worktree's code (the bench, the jobs, their Ray workers).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    common, student = [f"teacher_service.port={free_port()}"], "demo:student-same-tokenizer"
    if args.tiny:
        overrides, student = tiny_world(str(ROOT / args.out))
        common += overrides
    # Phase 2's student (the config's) does not exist yet; the shards need only its tokenizer (set in the config).
    gen_s = run_job("rayjobs.generate", [*common, f"distillation.student={student}"], logs / "generate.log", CONFIG)
    print(f"generation ready ({gen_s:.0f} s, skipped when complete)", flush=True)
    sft_out = f"{args.out}/sft/distill"
    sft_s = run_job("rayjobs.distill", [*common, "name=onpol-sft", f"distillation.student={student}",
                                        f"distillation.output={sft_out}", "distillation.loss.kind=data",
                                        "distillation.on_policy.fraction=0", f"distillation.optim.max_steps={args.sft_steps}"],
                    logs / "sft.log", CONFIG)
    sft = arm_figures(sft_out)
    print(f"phase 1 (SFT, {args.sft_steps} steps): EM {sft['em']:.3f}, teacher agreement {sft['agreement']:.3f} "
          f"({sft_s:.0f} s)", flush=True)
    with (logs / "teacher.log").open("wb") as log:
        teacher = start_teacher(common, log)
        try:
            runs = [run_seed(seed, args, common, str(ROOT / sft_out / "merged"), logs) for seed in range(args.seeds)]
        finally:
            stop_teacher(teacher)
    em = {arm: [r[arm]["em"] for r in runs] for arm in ("off", "on")}
    diffs = [a - b for a, b in zip(em["on"], em["off"], strict=True)]
    rates = [x for r in runs for x in r["on"]["scoring_rates"]]
    print(json.dumps({
        "seeds": args.seeds, "sft_steps": args.sft_steps, "steps": args.steps, "fraction": args.fraction,
        "sft_em": sft["em"],
        "on_policy_mean_em": round(statistics.mean(em["on"]), 4),
        "off_policy_mean_em": round(statistics.mean(em["off"]), 4),
        "paired_diff_mean": round(statistics.mean(diffs), 4),
        "paired_diff_ci95": ci95(diffs),
        "on_policy_mean_teacher_agreement": round(statistics.mean(r["on"]["agreement"] for r in runs), 4),
        "off_policy_mean_teacher_agreement": round(statistics.mean(r["off"]["agreement"] for r in runs), 4),
        "on_policy_mean_wall_s": round(statistics.mean(r["on"]["wall_s"] for r in runs), 1),
        "off_policy_mean_wall_s": round(statistics.mean(r["off"]["wall_s"] for r in runs), 1),
        "on_policy_mean_teacher_tokens": round(statistics.mean(r["on"]["teacher_scored_tokens"] for r in runs)),
        "off_policy_mean_teacher_tokens": round(statistics.mean(r["off"]["teacher_scored_tokens"] for r in runs)),
        "teacher_scored_tokens_per_s": round(statistics.median(rates), 1) if rates else 0.0,
    }))


if __name__ == "__main__":
    main()
