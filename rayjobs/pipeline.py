"""Job: the whole loop (``python -m rayjobs.pipeline --config FILE`` / ``raystill run FILE``).

generate -> evaluate teacher and untrained student -> distill + merge + evaluate -> gate ->
serve -> one real query through the endpoint -> summary.json + report.md under runs/<name>/.
Stages whose output is already complete for this config are skipped.
"""

from __future__ import annotations

import json
import os
import sys
import time

from cluster.storage import join, read_bytes
from rayjobs.config import DISTILL_DIGEST_EXCLUDE, PipelineConfig
from rayjobs.entry import run_job
from rayjobs.refs import resolve_ref


class GateFailed(RuntimeError):
    """The distilled student missed the evaluation gate; it is not deployed."""


def _stage(name: str, log):
    log(f"\n=== {name} ===")
    return time.perf_counter()


def _reuse_distillation(cfg: PipelineConfig) -> dict | None:
    data = read_bytes(join(cfg.distillation.output, "summary.json"))
    if not data:
        return None
    summary = json.loads(data)
    return summary if summary.get("config_digest") == cfg.digest(exclude=DISTILL_DIGEST_EXCLUDE) else None


def query_endpoint(url: str, model: str, messages: list[dict], api_key: str | None) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=api_key or "none", timeout=120, max_retries=2)
    start = time.perf_counter()
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=128, temperature=0.0)
    latency = time.perf_counter() - start
    tokens = resp.usage.completion_tokens if resp.usage else 0
    return {"answer": resp.choices[0].message.content, "latency_s": latency,
            "tokens_per_s": tokens / latency if latency > 0 else None}


def _api_key(cfg: PipelineConfig) -> str | None:
    s = cfg.serving
    if s.api_key_file and os.path.exists(s.api_key_file):
        return open(s.api_key_file).read().strip()
    return os.environ.get(s.api_key_env) if s.api_key_env else None


def _usage(url: str, model: str, key: str | None) -> str:
    auth = ' -H "Authorization: Bearer $RAYSTILL_API_KEY"' if key else ""
    return (
        f"  curl {url}/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is 123 + 456?\"}}]}}'\n"
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}', api_key='{'$KEY' if key else 'none'}'); "
        f"print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'What is 123 + 456?'}}]).choices[0].message.content)\""
    )


def run(cfg: PipelineConfig, log=print, serve: bool = True, block: bool = False) -> dict:
    from rayjobs import distill, generate
    from rayjobs import serve as serving
    from rayjobs.report import summary_table, write_report

    if serve:
        serving.prepare_local_ray(cfg)  # the local Ray the first stage starts is the one that serves
    t0 = _stage("1/4 generate (teacher via ray.data.llm + vLLM)", log)
    manifest = generate.run(cfg, log)

    t1 = _stage("2/4 baseline: teacher and untrained student on held-out prompts", log)
    teacher = distill.evaluate(cfg, resolve_ref(cfg.generation.teacher))
    before = distill.evaluate(cfg, resolve_ref(cfg.distillation.student))
    log(f"baseline: teacher EM {teacher.get('em')}, untrained student EM {before.get('em')} on {teacher.get('n')} prompts")

    t2 = _stage("3/4 distill (Ray Train + DeepSpeed), merge, evaluate", log)
    dsum = _reuse_distillation(cfg)
    if dsum:
        log(f"distill: {cfg.distillation.output}/summary.json is complete for this config; skipping")
    else:
        dsum = distill.run(cfg, log)
    summary = {
        "run": cfg.name,
        "teacher_em": teacher.get("em"),
        "student_em_before": before.get("em"),
        "student_em_after": dsum["eval"]["em"],
        "teacher_agreement": dsum["eval"].get("teacher_agreement"),
        "eval_n": dsum["eval"].get("n"),
        "passed_gate": dsum["gate"]["passed"],
        "gate": dsum["gate"],
        "generation_tokens_per_s": manifest.get("throughput", {}).get("tokens_per_s"),
        "train_tokens_per_s": dsum.get("train_tokens_per_s"),
        "merged": dsum["merged"],
        "endpoint": None,
        "stage_s": {"generate": round(t1 - t0, 1), "baseline": round(t2 - t1, 1),
                    "distill": round(time.perf_counter() - t2, 1)},
    }
    curves = dsum.get("curves", {}).get("png")
    if not summary["passed_gate"]:
        _refuse_to_deploy(cfg, summary, manifest, curves, log)

    if serve:
        served = _serve_and_query(cfg, log)
        summary["stage_s"]["serve"] = served.pop("serve_s")
        summary.update(served)

    report = write_report(cfg.run_dir, summary, cfg.model_dump(mode="json"), manifest, curves)
    log("\n" + summary_table(summary))
    log(f"\nreport: {report}\nsummary: {join(cfg.run_dir, 'summary.json')}")
    if not summary["endpoint"]:
        return summary
    from rayjobs.serve import StopSignals, serve_until_stopped

    stop = StopSignals() if block else None  # a signal sent once the endpoint is announced stops it cleanly
    log("\nquery the student:\n" + _usage(summary["endpoint"], cfg.serving.model_id, _api_key(cfg)))
    if stop:
        log("\nserving until Ctrl-C (set DEMO_EXIT=1 to exit after the query)")
        raise SystemExit(serve_until_stopped(cfg, log, stop=stop))
    return summary


def _refuse_to_deploy(cfg: PipelineConfig, summary: dict, manifest: dict, curves: str | None, log) -> None:
    from rayjobs.report import summary_table, write_report

    failed = [f"{c['metric']}={c['value']} < {c['min']}" for c in summary["gate"]["checks"] if not c["passed"]]
    write_report(cfg.run_dir, summary, cfg.model_dump(mode="json"), manifest, curves)
    log(summary_table(summary))
    raise GateFailed(f"student missed the gate ({', '.join(failed)}); not deploying. "
                     f"See {join(cfg.run_dir, 'report.md')}")


def _serve_and_query(cfg: PipelineConfig, log) -> dict:
    """Deploy the student and ask it one held-out question; the summary's endpoint fields."""
    from rayjobs import distill
    from rayjobs import serve as serving

    t3 = _stage("4/4 serve (Ray Serve LLM, autoscaled) and query", log)
    url = serving.run(cfg, log, block=False)
    record = distill.eval_records(resolve_ref(cfg.distillation.data), 1)
    messages = json.loads(record[0]["messages"]) if record else [{"role": "user", "content": "What is 12 + 34?"}]
    answer = query_endpoint(url, cfg.serving.model_id, messages, _api_key(cfg))
    log(f"query: {messages[-1]['content']!r} -> {answer['answer']!r} in {answer['latency_s']:.2f}s")
    return {"endpoint": url, "query_latency_s": answer["latency_s"], "query_tokens_per_s": answer["tokens_per_s"],
            "query_answer": answer["answer"], "serve_s": round(time.perf_counter() - t3, 1)}


def _job(cfg: PipelineConfig) -> None:
    try:
        run(cfg, block=False)
    except GateFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__.splitlines()[0], _job, "run", argv)


if __name__ == "__main__":
    sys.exit(main())
