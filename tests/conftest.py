"""Shared fixtures. Real engines start once per session: Ray is expensive on 2 cores.

S3 tests talk to a real S3-protocol server (moto's standalone server) on loopback.
Its endpoint and dummy credentials are exported at import time, before any Ray
starts, so Ray workers inherit them exactly as they would on a cluster.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.ports import free_port

S3_PORT = free_port()
os.environ.update({
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
})
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAYSTILL_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "raystill"))


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for every test that needs one, sized by cluster.sizing like the jobs."""
    import ray

    from cluster.config import ClusterConfig
    from cluster.connect import ray_init

    ray_init(ClusterConfig())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on loopback; yields a boto3 client."""
    import boto3

    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    deadline = time.time() + 30
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.3)
    yield client
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny demo world (untrained-quality models, real HF/vLLM layout) built in seconds."""
    from rayjobs.demo.world import DemoRecipe, prepare

    return prepare(str(tmp_path_factory.mktemp("world")), DemoRecipe.tiny(), progress=lambda *a: None)


@pytest.fixture(scope="session")
def world_config(tiny_world):
    """``world_config(name, tmp, **sections)``: a PipelineConfig over the tiny world, outputs under ``tmp``."""
    from rayjobs.config import PipelineConfig

    def make(name: str, tmp, **sections) -> PipelineConfig:
        distillation = {"student": str(tiny_world.student), "output": str(tmp / "distill"),
                        **sections.pop("distillation", {})}
        return PipelineConfig.model_validate({
            "name": name,
            "generation": {"teacher": str(tiny_world.teacher), "input": {"path": str(tiny_world.train_jsonl)},
                           "output": str(tmp / "gen"), **sections.pop("generation", {})},
            "distillation": distillation, **sections,
        })

    return make


@pytest.fixture(scope="session")
def r1_tiny_world(tmp_path_factory):
    """The r1-qwen world's tiny recipe: real R1/Qwen2.5 tokenizers and full vocabularies, few training steps."""
    from rayjobs.demo.r1_world import R1Recipe, prepare_r1

    return prepare_r1(str(tmp_path_factory.mktemp("r1-world")), R1Recipe.tiny(), progress=lambda *a: None)


class WorldBucket:
    """A bucket on the moto server holding the tiny world: ``models/teacher``, ``models/student`` (the
    same-tokenizer student) and ``prompts/train.jsonl``; ``keys``/``read`` for what jobs wrote there."""

    def __init__(self, client, name: str, world):
        self.client, self.name = client, name
        client.create_bucket(Bucket=name)
        for local, prefix in ((world.teacher, "models/teacher"), (world.student_same_tokenizer, "models/student")):
            for f in sorted(Path(local).rglob("*")):
                if f.is_file():
                    client.upload_file(str(f), name, f"{prefix}/{f.relative_to(local).as_posix()}")
        client.upload_file(str(world.train_jsonl), name, "prompts/train.jsonl")

    def config(self, name: str) -> dict:
        """A pipeline config over this bucket, every artifact on S3. The tiny world's models are
        untrained, so the gate is off (plumbing, not quality) and truncated samples are kept (the
        teacher rarely stops)."""
        s3 = f"s3://{self.name}"
        return {
            "name": name,
            "runs_root": f"{s3}/runs",
            "generation": {
                "teacher": f"{s3}/models/teacher",
                "input": {"path": f"{s3}/prompts/train.jsonl", "limit": 48},
                "output": f"{s3}/generated",
                "sampling": {"max_new_tokens": 40, "logprobs_topk": 4},
                "engine": {"batch_size": 16, "max_model_len": 256},
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
            "serving": {"port": free_port(), "max_model_len": 128, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
        }

    def keys(self, prefix: str) -> set[str]:
        """Keys under ``prefix``, without it."""
        keys: set[str] = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            keys.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
        return keys

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()


@pytest.fixture(scope="session")
def world_bucket(s3_server, tiny_world):
    """``make(name)``: a new ``WorldBucket`` of that name."""
    return lambda name: WorldBucket(s3_server, name, tiny_world)
