"""Submit raystill jobs to a Ray cluster from a laptop (Ray Jobs API over the dashboard port).

The repository is the job's ``working_dir``; the resolved config (overrides applied) travels
in the job's environment (``--config env:RAYSTILL_CONFIG_YAML``), so the job runs exactly the
config validated here, wherever the original file lived.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

# Never uploaded: environments, artifacts and caches can be gigabytes; credentials never leave the laptop.
EXCLUDES = [".venv/", "venv/", "runs/", ".cache/", ".git/", "**/__pycache__/", "*.egg-info/",
            ".pytest_cache/", "*.parquet", "*.safetensors",
            "*.env", ".env", ".env.*", "*.pem", "*.key", "*.token", "*_token", "credentials", "*credentials.json",
            ".aws/", ".netrc", "*.secret"]
CONFIG_ENV = "RAYSTILL_CONFIG_YAML"
# Forwarded when set locally: where S3 is, never the credentials (those come from the cluster), nor the
# laptop's RAYSTILL_CACHE: every node keeps its own cache (a path on the laptop is nothing on a pod).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")
STAGES = ("pipeline", "generate", "distill", "serve")
AGENT_WAIT_S = 60


def auth_headers(token_file: str | None = None) -> dict[str, str]:
    """Bearer token for clusters with Ray token auth (on by default for new clusters in Ray 2.60)."""
    token = None
    if token_file:
        token = Path(token_file).expanduser().read_text().strip()
    elif os.environ.get("RAY_AUTH_TOKEN"):
        token = os.environ["RAY_AUTH_TOKEN"].strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str, token_file: str | None = None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers(token_file) or None)


def runtime_env(working_dir: str, env_vars: dict[str, str]) -> dict:
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.update(env_vars)
    return {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env}


def submit(cfg, address: str, stage: str = "pipeline", working_dir: str = ".", token_file: str | None = None,
           submission_id: str | None = None) -> str:
    """Submit ``python -m rayjobs.<stage>`` with the resolved ``cfg``; returns the submission id."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}' (choose from {', '.join(STAGES)})")
    submission_id = submission_id or f"raystill-{cfg.name}-{stage}-{int(time.time())}"
    env = runtime_env(working_dir, cfg.cluster.env_vars)
    env["env_vars"][CONFIG_ENV] = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    c = client(address, token_file)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return c.submit_job(
                entrypoint=f"python -m rayjobs.{stage} --config env:{CONFIG_ENV}",
                submission_id=submission_id,
                runtime_env=env,
                metadata={"raystill_run": cfg.name, "raystill_stage": stage},
            )
        except RuntimeError as e:
            # A freshly started head answers 500 until its job agent is up.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def follow(c, submission_id: str, out=print, poll_s: float = 1.0) -> str:
    """Print logs as they come until the job ends; returns its final status."""
    from ray.job_submission import JobStatus

    printed = 0
    while True:
        status = c.get_job_status(submission_id)
        logs = c.get_job_logs(submission_id)
        if len(logs) > printed:
            out(logs[printed:].rstrip("\n"))
            printed = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(poll_s)
