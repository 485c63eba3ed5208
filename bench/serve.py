"""Serving benchmark: our Serve app (guard included) vs a bare vLLM OpenAI server, same model.

Both servers run at once with the same engine arguments; the load alternates between them
in rounds (each round: N chat requests at concurrency C, greedy, a fixed number of new
tokens), so drift in the machine's background load hits both sides alike. Prints the
side-by-side numbers and ends with one JSON line:

  p50_latency_ratio   our p50 request latency / bare vLLM's      (goal <= 1.25)
  throughput_ratio    our requests/s / bare vLLM's                (goal >= 0.8)

Usage: python bench/serve.py [--requests 128] [--concurrency 8] [--max-tokens 32] [--rounds 6]
       [--model DIR|demo:student]   (default: the tiny demo world's student, built in a temp dir)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.ports import free_port  # noqa: E402

MODEL_ID = "raystill-student"
API_KEY = "bench-key"


def tiny_student(cache_dir: str) -> str:
    """The tiny demo world's student (a 1-layer Llama, head_dim 32 as vLLM CPU needs)."""
    from rayjobs.demo.world import DemoRecipe, prepare

    return str(prepare(cache_dir, DemoRecipe.tiny(), progress=lambda *_: None).student)


MAX_ONGOING = 256  # one engine on each side, never throttled by Serve


def engine_args(model: str, max_model_len: int | None, kv_cache_gib: float | None) -> dict:
    """What service.llm_config derives for CPU (KV cache in bytes); the bare server gets the same."""
    from service.config import ServingConfig
    from service.llm_config import kv_cache_size

    serving = ServingConfig(model=model, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                            autoscaling={"max_ongoing_requests": MAX_ONGOING})
    kv = kv_cache_size(serving, model)
    return {"enforce_eager": True, "max_model_len": max_model_len, "kv_cache_memory_bytes": kv.bytes}


def start_bare(model: str, port: int, engine: dict, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", MODEL_ID, "--host", "127.0.0.1", "--port", str(port),
           "--kv-cache-memory-bytes", str(engine["kv_cache_memory_bytes"])]
    if engine["max_model_len"]:
        cmd += ["--max-model-len", str(engine["max_model_len"])]
    if engine["enforce_eager"]:
        cmd.append("--enforce-eager")
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bare vLLM exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("bare vLLM did not become ready")


def start_ours(model: str, port: int, engine: dict) -> str:
    from rayjobs.config import PipelineConfig
    from rayjobs.serve import run

    os.environ["RAYSTILL_BENCH_KEY"] = API_KEY
    cfg = PipelineConfig.model_validate({
        "name": "bench-serve",
        "generation": {"teacher": model, "input": {"path": "unused.jsonl"}, "output": "unused"},
        "distillation": {"student": model, "output": "unused"},
        "serving": {
            "model": model, "model_id": MODEL_ID, "port": port, "api_key_env": "RAYSTILL_BENCH_KEY",
            "max_model_len": engine["max_model_len"], "kv_cache_gib": engine["kv_cache_memory_bytes"] / (1 << 30),
            # One engine on each side: this measures the serving path, not scale-out.
            "autoscaling": {"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": MAX_ONGOING,
                            "max_queued_requests": -1},
        },
    })
    return run(cfg, log=lambda *_: None, block=False).removesuffix("/v1")


async def load(url: str, n: int, concurrency: int, max_tokens: int, headers: dict) -> tuple[list[float], float]:
    """n chat requests, at most ``concurrency`` in flight; returns (latencies, wall seconds)."""
    import httpx

    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            body = {"model": MODEL_ID, "messages": [{"role": "user", "content": f"What is {i} + {i * 7 % 100}?"}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            async with sem:
                t = time.perf_counter()
                r = await client.post(url + "/v1/chat/completions", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return latencies, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=128, help="requests per round and side")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (ignore_eos)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--model", default=None, help="model dir or demo: reference (default: the tiny demo student)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV cache per engine (default: derived from the model and context, as serving does)")
    args = p.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    if args.model:
        from cluster.storage import localize
        from rayjobs.refs import resolve_ref

        model = localize(resolve_ref(args.model))  # the bare server beside ours loads from this disk
    else:
        model = tiny_student(tmp.name)
    engine = engine_args(model, args.max_model_len, args.kv_cache_gib)
    bare_port, our_port = free_port(), free_port()
    bare_log = Path(tmp.name) / "bare-vllm.log"
    bare = start_bare(model, bare_port, engine, bare_log)
    try:
        t0 = time.monotonic()
        ours = start_ours(model, our_port, engine)
        print(f"our app ready after {time.monotonic() - t0:.0f} s", flush=True)
        bare_url = f"http://127.0.0.1:{bare_port}"
        wait_ready(bare_url, bare, bare_log)
        sides = {"ours": (ours, {"Authorization": f"Bearer {API_KEY}"}), "bare": (bare_url, {})}
        for url, headers in sides.values():  # warm-up, not measured
            asyncio.run(load(url, 2 * args.concurrency, args.concurrency, args.max_tokens, headers))
        results = {name: {"latencies": [], "wall": 0.0, "n": 0} for name in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                url, headers = sides[name]
                lat, wall = asyncio.run(load(url, args.requests, args.concurrency, args.max_tokens, headers))
                res = results[name]
                res["latencies"] += lat
                res["wall"] += wall
                res["n"] += len(lat)
                print(f"round {r + 1}/{args.rounds} {name:>4}: p50 {statistics.median(lat) * 1000:6.1f} ms, "
                      f"{len(lat) / wall:6.1f} req/s", flush=True)
    finally:
        bare.terminate()
        try:
            bare.wait(timeout=30)
        except subprocess.TimeoutExpired:
            bare.kill()
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()  # before the summary, so no late worker logs follow the JSON line
        tmp.cleanup()

    summary = {}
    for name, res in results.items():
        lat = sorted(res["latencies"])
        summary[name] = {"p50_s": statistics.median(lat), "p90_s": lat[int(0.9 * (len(lat) - 1))],
                         "req_per_s": res["n"] / res["wall"], "requests": res["n"]}
    print(f"{'':>6} {'p50 ms':>8} {'p90 ms':>8} {'req/s':>8}")
    for name, s in summary.items():
        print(f"{name:>6} {s['p50_s'] * 1000:8.1f} {s['p90_s'] * 1000:8.1f} {s['req_per_s']:8.1f}")
    print(json.dumps({
        "p50_latency_ratio": round(summary["ours"]["p50_s"] / summary["bare"]["p50_s"], 3),
        "throughput_ratio": round(summary["ours"]["req_per_s"] / summary["bare"]["req_per_s"], 3),
        "ours": summary["ours"], "bare": summary["bare"],
        "requests_per_round": args.requests, "rounds": args.rounds, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "cpu_cores": os.cpu_count(),
        "proxy": "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "serve-python-proxy",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
