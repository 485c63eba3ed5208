"""The main job end to end with every artifact on S3 (moto's standalone server on loopback).

``python -m rayjobs.pipeline`` runs in its own process with its own local Ray, exactly as a user's
job would: teacher, student and prompts are read from S3; shards, checkpoints, the merged model,
the run report and the served request log are written there. The tiny demo world's models are
untrained, so the gate is off: this test is about plumbing, not quality (``make demo`` checks that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.ports import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "raystill-pipeline"


def _upload_dir(client, local: Path, prefix: str) -> None:
    for f in sorted(local.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(local).as_posix()}")


def _keys(client, prefix: str) -> set[str]:
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
    return keys


@pytest.fixture(scope="module")
def s3_run(tiny_world, s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline-s3")
    s3_server.create_bucket(Bucket=BUCKET)
    _upload_dir(s3_server, Path(tiny_world.teacher), "models/teacher")
    _upload_dir(s3_server, Path(tiny_world.student_same_tokenizer), "models/student")
    s3_server.upload_file(str(tiny_world.train_jsonl), BUCKET, "prompts/train.jsonl")
    s3 = f"s3://{BUCKET}"
    cfg = {
        "name": "s3-demo",
        "runs_root": f"{s3}/runs",
        "generation": {
            "teacher": f"{s3}/models/teacher",
            "input": {"path": f"{s3}/prompts/train.jsonl", "limit": 48},
            "output": f"{s3}/generated",
            "sampling": {"max_new_tokens": 40, "logprobs_topk": 4},
            "engine": {"batch_size": 16, "max_model_len": 256},
            # The tiny teacher is untrained: it rarely stops, so truncated samples are kept.
            "preprocess": {"keep": "all", "val_fraction": 0.25, "drop_truncated": False},
        },
        "distillation": {
            "student": f"{s3}/models/student",
            "output": f"{s3}/distill",
            "max_seq_len": 128,
            "loss": {"kind": "logit"},
            "optim": {"max_steps": 3, "micro_batch_size": 8},
            "checkpoint_every": 2,
            "eval": {"limit": 8, "max_new_tokens": 24},
        },
        "serving": {
            "port": free_port(),
            "max_model_len": 128,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            "request_log": {"enabled": True, "path": f"{s3}/request-log", "batch_rows": 1, "flush_interval_s": 1},
        },
    }
    path = tmp / "s3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp / "pipeline.log"
    # The job starts its own Ray and picks its own Serve/HAProxy settings, as a user's would; the
    # serving tests' settings (set at collection, fixed HAProxy ports) must not leak into it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")} | {"RAY_ADDRESS": ""}
    # Output to a file: an unread pipe fills up with vLLM's logs and blocks the job.
    with log.open("wb") as out:
        proc = subprocess.run([sys.executable, "-m", "rayjobs.pipeline", "--config", str(path)], cwd=ROOT,
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1100)
    return proc.returncode, log.read_text(errors="replace"), s3_server


def test_pipeline_exits_zero_and_prints_the_summary(s3_run):
    rc, out, _ = s3_run
    assert rc == 0, out[-4000:]
    for line in ("teacher EM", "student EM before", "student EM after", "endpoint", "curl "):
        assert line in out, f"{line!r} missing from the console output"


def test_every_artifact_is_on_s3(s3_run):
    rc, out, client = s3_run
    assert rc == 0, out[-4000:]
    generated = _keys(client, "generated/")
    assert "manifest.json" in generated and any(k.startswith("samples/") for k in generated)
    distill = _keys(client, "distill/")
    assert any(k.startswith("checkpoints/") for k in distill), sorted(distill)[:20]
    assert "merged/RELEASE.json" in distill  # the served location: a pointer to the released version
    versions = {k.split("/")[1] for k in distill if k.startswith("versions/")}
    assert len(versions) == 1, sorted(distill)
    (version,) = versions
    assert {f"versions/{version}/config.json", f"versions/{version}/tokenizer.json"} <= distill
    assert any(k.startswith(f"versions/{version}/") and k.endswith(".safetensors") for k in distill)
    run = _keys(client, "runs/s3-demo/")
    assert {"summary.json", "report.md", "em.png"} <= run, sorted(run)


def test_summary_holds_the_promised_fields(s3_run):
    rc, out, client = s3_run
    assert rc == 0, out[-4000:]
    summary = json.loads(client.get_object(Bucket=BUCKET, Key="runs/s3-demo/summary.json")["Body"].read())
    for key in ("teacher_em", "student_em_before", "student_em_after", "passed_gate", "endpoint"):
        assert key in summary, key
    assert summary["passed_gate"] is True
    assert summary["endpoint"].startswith("http://")
    report = client.get_object(Bucket=BUCKET, Key="runs/s3-demo/report.md")["Body"].read().decode()
    assert "em.png" in report and "## Config" in report


def test_served_request_reaches_the_request_log(s3_run):
    rc, out, client = s3_run
    assert rc == 0, out[-4000:]
    deadline = time.time() + 5
    while not _keys(client, "request-log/") and time.time() < deadline:
        time.sleep(0.5)
    keys = sorted(_keys(client, "request-log/"))
    assert keys, "no request log object written"
    body = client.get_object(Bucket=BUCKET, Key=f"request-log/{keys[0]}")["Body"].read().decode()
    row = json.loads(body.splitlines()[0])
    assert row["messages"][-1]["role"] == "user"
