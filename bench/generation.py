"""Generation benchmark: our ray.data.llm pipeline vs direct vllm.LLM.generate, same prompts.

Prints the side-by-side numbers and ends with one JSON line:
  pipeline_vs_direct_tokens_per_s  pipeline tokens/s / direct tokens/s (wall, start-up included), top-k k
  pipeline_vs_direct_tokens_per_s_no_logprobs  the same with logprobs off (k = 0)
  topk_bytes_per_token             stored top-k bytes per generated token (goal <= 8k+16 at k=20)
  peak_rss_10x_over_1x             peak RSS of the whole process tree at 10x rows / at 1x rows

Each measurement runs in its own subprocess (own Ray, own engine) so peak memory and
start-up are comparable; both arms' clocks start before they import vLLM / our pipeline and
read the prompts. Usage: python bench/generation.py [--prompts 2048] [--k 20]
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


def _peak_rss(proc: subprocess.Popen) -> tuple[int, str]:
    peak = 0
    ps = psutil.Process(proc.pid)
    out = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            total = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.2)
    reader.join()
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed:\n{out[0][-4000:]}")
    return peak, out[0]


def _child(mode: str, args: list[str]) -> tuple[dict, int]:
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    peak, out = _peak_rss(proc)
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return result, peak


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
    args = ap.parse_args()

    from rayjobs.demo.world import prepare

    world = prepare(progress=lambda *a: None)
    if args.child == "direct":
        print(json.dumps(run_direct(str(world.teacher), Path(args.file), args.k, args.max_new_tokens)))
        return
    if args.child == "pipeline":
        print(json.dumps(run_pipeline(str(world.teacher), str(world.student_same_tokenizer), Path(args.file),
                                      Path(args.out), args.k, args.max_new_tokens)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="raystill-bench-gen-"))
    one = _prompts_file(world.train_jsonl, args.prompts // 10, tmp / "1x.jsonl")
    ten = _prompts_file(world.train_jsonl, args.prompts, tmp / "10x.jsonl")
    common = ["--k", str(args.k), "--max-new-tokens", str(args.max_new_tokens)]
    direct, _ = _child("direct", ["--file", str(ten), *common])
    pipe, peak10 = _child("pipeline", ["--file", str(ten), "--out", str(tmp / "out10"), *common])
    _, peak1 = _child("pipeline", ["--file", str(one), "--out", str(tmp / "out1"), *common])
    # The same pair without logprobs isolates what carrying top-k through ray.data.llm costs.
    plain = ["--k", "0", "--max-new-tokens", str(args.max_new_tokens)]
    direct0, _ = _child("direct", ["--file", str(ten), *plain])
    pipe0, _ = _child("pipeline", ["--file", str(ten), "--out", str(tmp / "out10k0"), *plain])
    ratio = pipe["tokens_per_s"] / direct["tokens_per_s"]
    ratio0 = pipe0["tokens_per_s"] / direct0["tokens_per_s"]
    print(f"prompts={args.prompts} max_new_tokens={args.max_new_tokens}")
    for k, d, p in ((args.k, direct, pipe), (0, direct0, pipe0)):
        print(f"k={k:<3} direct vllm.LLM : {d['tokens']} tokens in {d['wall_s']:.1f}s = {d['tokens_per_s']:.0f} tokens/s")
        print(f"k={k:<3} our pipeline    : {p['tokens']} tokens in {p['wall_s']:.1f}s = {p['tokens_per_s']:.0f} tokens/s"
              f"  (ratio {p['tokens_per_s'] / d['tokens_per_s']:.3f})")
    print(f"top-k {pipe['topk_bytes_per_token']} B/token (limit {8 * args.k + 16})")
    print(f"peak RSS: 1x {peak1 / 2**30:.2f} GiB, 10x {peak10 / 2**30:.2f} GiB")
    print(json.dumps({
        "pipeline_vs_direct_tokens_per_s": round(ratio, 3),
        "pipeline_vs_direct_tokens_per_s_no_logprobs": round(ratio0, 3),
        "topk_bytes_per_token": pipe["topk_bytes_per_token"],
        "peak_rss_10x_over_1x": round(peak10 / peak1, 3),
    }))

if __name__ == "__main__":
    main()
