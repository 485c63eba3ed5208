"""Generation benchmark: our generation pipeline vs direct vllm.LLM.generate, same prompts.

Every arm runs in a fresh subprocess (own Ray, own engine); the parent samples the CPU time (user +
sys) of that process and every descendant (Ray's GCS, raylet, workers, vLLM's engine core) every
0.1 s and keeps each process's last reading, so processes that exit are counted too. Both arms run
at N and 4N prompts, with and without top-k logprobs: the slope of CPU seconds over generated
tokens between the two sizes is the marginal CPU per token, the intercept the fixed (start-up) cost.
Wall-clock ratios on a shared 2-core machine move with other jobs' load; the CPU-time slopes do not
(much), so they are the figures to compare across runs.

Prints the side-by-side numbers and ends with one JSON line:
  marginal_overhead_us_per_token_k20  pipeline slope - direct slope, k = --k (goal <= 30)
  marginal_overhead_us_per_token_k0   the same without logprobs (goal <= 10)
  fixed_overhead_cpu_s                pipeline intercept - direct intercept at k = --k (Ray, actors)
  pipeline_vs_direct_tokens_per_s_4n  pipeline tokens/s / direct tokens/s at 4N, k = --k (wall,
                                      start-up included; goal >= 0.85)
  pipeline_vs_direct_tokens_per_s_no_logprobs_4n  the same at k = 0
  topk_bytes_per_token                stored top-k bytes per generated token (goal <= 8k+16)
  peak_rss_4n_over_n                  peak RSS of the pipeline's process tree at 4N / at N prompts
With --baseline DIR (another checkout, e.g. the code before a change), that checkout's pipeline arm
runs too, on the same prompts beside the same direct arms, and the line adds its figures as
baseline_<name>: before and after measured side by side in one run.

Both arms' clocks start before they import vLLM / our pipeline and read the prompts.
Usage: python bench/generation.py [--prompts 2048 (= 4N)] [--k 20] [--max-new-tokens 96] [--tiny]
                                 [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _prompts_file(src: str, n: int, dest: Path) -> Path:
    lines = [json.loads(x) for x in Path(src).read_text().splitlines() if x.strip()]
    with dest.open("w") as f:
        for i in range(n):
            row = dict(lines[i % len(lines)])
            row["id"] = f"b{i}"  # distinct ids: repeats are generated, not deduplicated away
            f.write(json.dumps(row) + "\n")
    return dest


def _watch(proc: subprocess.Popen) -> tuple[int, float, str]:
    """Peak RSS and total CPU seconds of ``proc``'s process tree, sampled until it exits."""
    peak, cpu = 0, {}
    ps = psutil.Process(proc.pid)
    out = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = 0
        try:
            tree = [ps, *ps.children(recursive=True)]
        except psutil.Error:
            tree = []
        for p in tree:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    rss += p.memory_info().rss
                    cpu[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass
        peak = max(peak, rss)
        time.sleep(0.1)
    reader.join()
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed:\n{out[0][-4000:]}")
    return peak, sum(cpu.values()), out[0]


def _child(mode: str, args: list[str], root: Path = ROOT) -> dict:
    """One arm in a fresh process, with ``root``'s checkout of this bench and of the pipeline."""
    proc = subprocess.Popen([sys.executable, str(root / "bench" / "generation.py"), "--child", mode, *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(root)})
    peak, cpu, out = _watch(proc)
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return {**result, "peak_rss": peak, "cpu_s": cpu}


def _line(runs: list[dict]) -> tuple[float, float]:
    """(marginal CPU seconds per token, fixed CPU seconds) through the two sizes' points."""
    (a, b) = runs
    slope = (b["cpu_s"] - a["cpu_s"]) / (b["tokens"] - a["tokens"])
    return slope, a["cpu_s"] - slope * a["tokens"]


def run_direct(teacher: str, prompts: Path, k: int, max_new: int) -> dict:
    # Both arms are timed from the same point: before importing their engine and reading the
    # prompts (the pipeline arm imports and renders inside its timed run, so direct does too).
    start = time.perf_counter()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(teacher)
    rows = [json.loads(x) for x in prompts.read_text().splitlines()]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
    from cluster.kv_cache import resolve_kv_cache

    # The KV cache the pipeline arm derives for the same engine (max_model_len 256, batch 256).
    kv = resolve_kv_cache(None, teacher, max_model_len=256, max_num_seqs=256)
    llm = LLM(model=teacher, kv_cache_memory_bytes=kv.bytes, enforce_eager=True, max_model_len=256,
              max_num_seqs=256, max_logprobs=max(20, k))
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=max_new, logprobs=k or None))
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def run_pipeline(teacher: str, student: str, prompts: Path, out: Path, k: int, max_new: int) -> dict:
    start = time.perf_counter()
    from rayjobs import generate
    from rayjobs.config import PipelineConfig

    cfg = PipelineConfig.model_validate({
        "name": "bench",
        "generation": {
            "teacher": teacher, "input": {"path": str(prompts)}, "output": str(out),
            "sampling": {"temperature": 0.0, "max_new_tokens": max_new, "logprobs_topk": k},
            "engine": {"batch_size": 256, "max_model_len": 256},
            "preprocess": {"keep": "all", "drop_truncated": False, "dedupe": False},
        },
        "distillation": {"student": student, "output": str(out / "distill"), "max_seq_len": 256},
    })
    manifest = generate.run(cfg, log=lambda *a: None)
    wall = time.perf_counter() - start
    tokens = manifest["generated_tokens"]
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "topk_bytes_per_token": manifest["topk_bytes_per_token"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2048)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--child", default=None)
    ap.add_argument("--file", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny test world (built in seconds; an untrained teacher that rarely stops early)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout whose pipeline arm runs beside ours (figures as baseline_*)")
    args = ap.parse_args()

    from rayjobs.demo.world import DemoRecipe, prepare

    if args.tiny:
        world = prepare(str(Path(tempfile.gettempdir()) / "raystill-bench-tiny-world"), DemoRecipe.tiny(),
                        progress=lambda *a: None)
    else:
        world = prepare(progress=lambda *a: None)
    if args.child == "direct":
        print(json.dumps(run_direct(str(world.teacher), Path(args.file), args.k, args.max_new_tokens)))
        return
    if args.child == "pipeline":
        print(json.dumps(run_pipeline(str(world.teacher), str(world.student_same_tokenizer), Path(args.file),
                                      Path(args.out), args.k, args.max_new_tokens)))
        return

    _compare(world, args)


def _compare(world, args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="raystill-bench-gen-"))
    sizes = {"n": _prompts_file(world.train_jsonl, args.prompts // 4, tmp / "n.jsonl"),
             "4n": _prompts_file(world.train_jsonl, args.prompts, tmp / "4n.jsonl")}
    arms = {"pipeline": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    runs: dict[tuple, dict] = {}
    print(f"prompts N={args.prompts // 4}, 4N={args.prompts}, max_new_tokens={args.max_new_tokens}")
    for k in (args.k, 0):  # k = 0 isolates what carrying top-k costs
        common = ["--k", str(k), "--max-new-tokens", str(args.max_new_tokens), *(["--tiny"] if args.tiny else [])]
        for size, file in sizes.items():
            for arm, root in {"direct": ROOT, **arms}.items():
                mode, out = ("direct", []) if arm == "direct" else ("pipeline", ["--out", str(tmp / f"out-{arm}-{k}-{size}")])
                r = runs[arm, k, size] = _child(mode, ["--file", str(file), *out, *common], root)
                # Each run as it ends: a run cut short still leaves its finished arms.
                print(f"k={k:<3} {size:>2} {arm:<8}: {r['tokens']} tokens in {r['wall_s']:.1f}s = "
                      f"{r['tokens_per_s']:.0f} tokens/s, {r['cpu_s']:.1f} CPU-s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB",
                      flush=True)
    lines = {(arm, k): _line([runs[arm, k, "n"], runs[arm, k, "4n"]]) for arm in ("direct", *arms) for k in (args.k, 0)}
    for (arm, k), (slope, fixed) in lines.items():
        print(f"k={k:<3} {arm:<8}: {slope * 1e6:.1f} us CPU per token, {fixed:.1f} CPU-s fixed")
    figures = {}
    for arm in arms:
        pipe = runs[arm, args.k, "4n"]
        print(f"{arm}: top-k {pipe['topk_bytes_per_token']} B/token (limit {8 * args.k + 16})")
        prefix = "" if arm == "pipeline" else f"{arm}_"
        figures |= {prefix + name: value for name, value in _figures(runs, lines, arm, args.k).items()}
    print(json.dumps(figures))


def _figures(runs: dict, lines: dict, arm: str, k: int) -> dict:
    """The JSON line's figures of one pipeline arm against the direct arm."""

    def ratio(at_k):
        return runs[arm, at_k, "4n"]["tokens_per_s"] / runs["direct", at_k, "4n"]["tokens_per_s"]

    return {
        f"marginal_overhead_us_per_token_k{k}": round(1e6 * (lines[arm, k][0] - lines["direct", k][0]), 1),
        "marginal_overhead_us_per_token_k0": round(1e6 * (lines[arm, 0][0] - lines["direct", 0][0]), 1),
        "fixed_overhead_cpu_s": round(lines[arm, k][1] - lines["direct", k][1], 1),
        "pipeline_vs_direct_tokens_per_s_4n": round(ratio(k), 3),
        "pipeline_vs_direct_tokens_per_s_no_logprobs_4n": round(ratio(0), 3),
        "topk_bytes_per_token": runs[arm, k, "4n"]["topk_bytes_per_token"],
        "peak_rss_4n_over_n": round(runs[arm, k, "4n"]["peak_rss"] / runs[arm, k, "n"]["peak_rss"], 3),
    }


if __name__ == "__main__":
    main()
