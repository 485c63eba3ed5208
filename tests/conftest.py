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
