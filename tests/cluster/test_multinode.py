"""The jobs on a real multi-node Ray cluster (tests/cluster/conftest.py: a 0-CPU head, two worker nodes
with their own disks), every artifact on S3 (moto's server), jobs connected through RAY_ADDRESS or
submitted through the head's Jobs API, as on KubeRay.

One cluster for the module; the tests share its S3 bucket and run in file order: the pipeline
submitted at the end reuses the generation and distillation the earlier tests committed (the
stages skip complete outputs) and adds the baseline, serving and the query.
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
BUCKET = "raystill-multinode"
S3 = f"s3://{BUCKET}"
ONE_PER_NODE = {"vllm": 1}  # each worker node advertises one unit (conftest.WORKERS)


@pytest.fixture(scope="module")
def bucket(world_bucket):
    return world_bucket(BUCKET)


def config(bucket, name: str = "multinode") -> dict:
    """The bucket's pipeline config, spread over the worker nodes: two engines, two train ranks and
    two serving replicas, one of each per node; the one HTTP entry point on the head."""
    cfg = bucket.config(name)
    cfg["generation"]["input"]["limit"] = cfg["generation"]["sampling"]["max_new_tokens"] = 24
    cfg["generation"]["engine"] |= {"min_replicas": 2, "max_replicas": 2, "bundle_resources": ONE_PER_NODE}
    cfg["distillation"] |= {"optim": {"max_steps": 4, "micro_batch_size": 4}, "deepspeed": {"zero_stage": 2},
                            "scaling": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"}}
    cfg["serving"] |= {"proxy_location": "HeadOnly", "bundle_resources": ONE_PER_NODE,
                       "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    return cfg


def job(module: str, cfg: dict, tmp_path: Path, cluster) -> tuple[list[str], dict, Path]:
    """``python -m rayjobs.<module>``'s argv, environment and log file, on ``cluster`` (None: an embedded Ray)."""
    path = tmp_path / f"{module}-{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")} | {"RAY_ADDRESS": ""}
    env |= cluster.client_env if cluster else {}
    return [sys.executable, "-m", f"rayjobs.{module}", "--config", str(path)], env, path.with_suffix(".log")


def run_job(module: str, cfg: dict, tmp_path: Path, cluster, timeout: int = 600) -> tuple[int, str]:
    argv, env, log = job(module, cfg, tmp_path, cluster)
    with log.open("wb") as out:  # a file: an unread pipe fills up with vLLM's logs and blocks the job
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, log.read_text(errors="replace")


def actor_nodes(cluster, class_part: str, state: str | None = None) -> list[str]:
    """Our node names of the actors whose class name contains ``class_part`` (dead ones included; one the
    autoscaler asked for but no node could take, never placed, has no node and is left out)."""
    from ray.util.state import list_actors

    ids = cluster.node_ids()
    filters = [("state", "=", state)] if state else None
    actors = list_actors(address=cluster.dashboard, filters=filters, limit=10000, raise_on_missing_output=False)
    return [ids.get(a.node_id, a.node_id) for a in actors if class_part in (a.class_name or "") and a.node_id]


def sample_rows(location: str) -> list[tuple]:
    from datasets_pipeline.shards import ShardStore

    table = ShardStore(location).read_samples(["sample_id", "split", "teacher_token_ids"])
    return sorted(zip(table["sample_id"].to_pylist(), table["split"].to_pylist(),
                      table["teacher_token_ids"].to_pylist(), strict=True))


def test_generation_one_engine_per_node_from_s3_equals_single_node(loopback_cluster, bucket, tmp_path):
    started = time.monotonic()
    rc, out = run_job("generate", config(bucket), tmp_path, loopback_cluster)
    assert rc == 0, out[-4000:]
    print(f"multi-node generation: {time.monotonic() - started:.0f} s")
    engines = actor_nodes(loopback_cluster, "TeacherStage")
    # Known gap (#18): the second engine is sometimes never placed (Ray Data's other stage actors take
    # that node's CPUs first) and the run finishes on one; so: never two engines on one node, and
    # every node that ran one fetched the teacher itself.
    assert engines and len(engines) == len(set(engines)) and set(engines) <= {"node_a", "node_b"}, engines
    for name in engines:  # each node fetched the teacher's weights itself, into its own cache (localize)
        cache = loopback_cluster.root / name / "raystill-cache"
        assert list(cache.rglob("*.safetensors")), f"no teacher weights in {name}'s cache"
    rows = sample_rows(f"{S3}/generated")
    assert rows and len(rows) == len({r[0] for r in rows})  # each sample exactly once

    single = config(bucket, "single-node")
    single["generation"] |= {"output": f"{S3}/generated-single", "engine": bucket.config("x")["generation"]["engine"]}
    rc, out = run_job("generate", single, tmp_path, None)
    assert rc == 0, out[-4000:]
    assert rows == sample_rows(f"{S3}/generated-single")


def test_local_output_is_refused_on_a_multinode_cluster(loopback_cluster, bucket, tmp_path):
    cfg = config(bucket)
    cfg["distillation"] = {**cfg["distillation"], "output": str(tmp_path / "distill")}
    rc, out = run_job("distill", cfg, tmp_path, loopback_cluster, timeout=180)
    assert rc == 2, out[-3000:]
    assert "distillation.output" in out and "s3://" in out and "Traceback" not in out


def test_distillation_one_worker_per_node_checkpoints_on_s3(loopback_cluster, bucket, tmp_path):
    started = time.monotonic()
    rc, out = run_job("distill", config(bucket), tmp_path, loopback_cluster)
    assert rc == 0, out[-4000:]
    print(f"multi-node distillation (ZeRO-2): {time.monotonic() - started:.0f} s")
    assert sorted(actor_nodes(loopback_cluster, "RayTrainWorker")) == ["node_a", "node_b"]
    summary = json.loads(bucket.read("distill/summary.json"))
    assert summary["steps"] == summary["total_steps"] == 4
    checkpoints = bucket.keys("distill/checkpoints/multinode/")
    assert any(k.endswith("COMMITTED") for k in checkpoints), sorted(checkpoints)[:20]
    for name in ("node_a", "node_b"):  # each rank localized the student on its own node
        assert list((loopback_cluster.root / name / "raystill-cache" / "s3").rglob("config.json")), name


def test_pipeline_submitted_to_the_head_serves_from_both_worker_nodes(loopback_cluster, bucket, tmp_path):
    """``raystill submit`` as from a laptop; generation and distillation are the committed ones above."""
    import httpx

    cfg = config(bucket)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "rayjobs.cli", "submit", str(path), "--stage", "pipeline",
                        "--address", loopback_cluster.dashboard, "--follow"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=os.environ | loopback_cluster.client_env | {"RAY_ADDRESS": ""})
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, r.stdout[-4000:] + r.stderr[-3000:]
    print(f"submitted pipeline (baseline, serving, query): {time.monotonic() - started:.0f} s")
    assert "is complete for this config; skipping" in r.stdout  # the stages above were reused, not redone
    summary = json.loads(bucket.read("runs/multinode/summary.json"))
    assert summary["endpoint"] and summary["query_answer"] is not None

    replicas = actor_nodes(loopback_cluster, "ServeReplica", state="ALIVE")
    assert sorted(replicas) == ["node_a", "node_b"], replicas
    proxies = actor_nodes(loopback_cluster, "ProxyActor", state="ALIVE")
    assert proxies == [loopback_cluster.head_id], proxies  # HeadOnly: the one entry point is the head's
    url = f"http://127.0.0.1:{cfg['serving']['port']}/v1/chat/completions"
    body = {"model": "raystill-student", "messages": [{"role": "user", "content": "What is 12 + 34?"}],
            "max_tokens": 8}
    try:
        for _ in range(4):
            resp = httpx.post(url, json=body, timeout=120)
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["message"]["content"] is not None
    finally:  # the next test needs the replicas' memory
        subprocess.run([str(Path(sys.executable).with_name("serve")), "shutdown", "-y", "--address",
                        loopback_cluster.dashboard], env=os.environ | loopback_cluster.client_env, timeout=120)


def _wait_for_commit(bucket, run_dir: str, proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while not any(k.endswith("COMMITTED") for k in bucket.keys(run_dir)):
        assert proc.poll() is None and time.time() < deadline, log.read_text(errors="replace")[-4000:]
        time.sleep(0.5)


def test_node_loss_resumes_from_the_last_s3_checkpoint_on_a_fresh_node(loopback_cluster, bucket, tmp_path):
    """Last: it replaces node_b. A lost pod takes its rank with it; the run goes on with a new pod. ZeRO-3
    here (ZeRO-2 above): the checkpoint holds each rank's parameter shards, restored onto a node that
    never had them."""
    cfg = config(bucket, "multinode-loss")
    cfg["distillation"] |= {"output": f"{S3}/distill-loss", "max_failures": 2, "deepspeed": {"zero_stage": 3},
                            "optim": {"max_steps": 10, "micro_batch_size": 4}}
    argv, env, log = job("distill", cfg, tmp_path, loopback_cluster)
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for_commit(bucket, "distill-loss/checkpoints/multinode-loss/", proc, log)
            loopback_cluster.kill("node_b")
            loopback_cluster.add_worker("node_c", {"node_c": 1, "vllm": 1})
            rc = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    print(f"distillation with a node lost and replaced: {time.monotonic() - started:.0f} s")
    summary = json.loads(bucket.read("distill-loss/summary.json"))
    assert summary["steps"] == summary["total_steps"] == 10
    assert summary["restarts"] >= 1, summary
    curves = bucket.read("distill-loss/curves.jsonl").decode()
    steps = [json.loads(line)["step"] for line in curves.splitlines()]
    assert steps == list(range(1, 11)), steps  # each step exactly once: none lost, none repeated
    assert "node_c" in actor_nodes(loopback_cluster, "RayTrainWorker")
