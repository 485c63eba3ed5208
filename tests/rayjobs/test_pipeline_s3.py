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


pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "raystill-pipeline"


@pytest.fixture(scope="module")
def s3_run(world_bucket, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline-s3")
    bucket = world_bucket(BUCKET)
    cfg = bucket.config("s3-demo")
    cfg["serving"]["request_log"] = {"enabled": True, "path": f"s3://{BUCKET}/request-log", "batch_rows": 1,
                                     "flush_interval_s": 1}
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
    return proc.returncode, log.read_text(errors="replace"), bucket


def test_pipeline_exits_zero_and_prints_the_summary(s3_run):
    rc, out, _ = s3_run
    assert rc == 0, out[-4000:]
    for line in ("teacher EM", "student EM before", "student EM after", "endpoint", "curl "):
        assert line in out, f"{line!r} missing from the console output"


def test_every_artifact_is_on_s3(s3_run):
    rc, out, bucket = s3_run
    assert rc == 0, out[-4000:]
    generated = bucket.keys("generated/")
    assert "manifest.json" in generated and any(k.startswith("samples/") for k in generated)
    distill = bucket.keys("distill/")
    assert any(k.startswith("checkpoints/") for k in distill), sorted(distill)[:20]
    assert "merged/RELEASE.json" in distill  # the served location: a pointer to the released version
    versions = {k.split("/")[1] for k in distill if k.startswith("versions/")}
    assert len(versions) == 1, sorted(distill)
    (version,) = versions
    assert {f"versions/{version}/config.json", f"versions/{version}/tokenizer.json"} <= distill
    assert any(k.startswith(f"versions/{version}/") and k.endswith(".safetensors") for k in distill)
    run = bucket.keys("runs/s3-demo/")
    assert {"summary.json", "report.md", "em.png"} <= run, sorted(run)


def test_summary_holds_the_promised_fields(s3_run):
    rc, out, bucket = s3_run
    assert rc == 0, out[-4000:]
    summary = json.loads(bucket.read("runs/s3-demo/summary.json"))
    for key in ("teacher_em", "student_em_before", "student_em_after", "passed_gate", "endpoint"):
        assert key in summary, key
    assert summary["passed_gate"] is True
    assert summary["endpoint"].startswith("http://")
    report = bucket.read("runs/s3-demo/report.md").decode()
    assert "em.png" in report and "## Config" in report


def test_served_request_reaches_the_request_log(s3_run):
    rc, out, bucket = s3_run
    assert rc == 0, out[-4000:]
    deadline = time.time() + 5
    while not bucket.keys("request-log/") and time.time() < deadline:
        time.sleep(0.5)
    keys = sorted(bucket.keys("request-log/"))
    assert keys, "no request log object written"
    body = bucket.read(f"request-log/{keys[0]}").decode()
    row = json.loads(body.splitlines()[0])
    assert row["messages"][-1]["role"] == "user"
