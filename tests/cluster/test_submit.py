"""Job submission: unit checks, then a real `ray start --head` with its dashboard."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.submit import EXCLUDES, auth_headers, runtime_env

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def test_runtime_env_excludes_heavy_dirs_and_forwards_no_secrets(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hush")
    env = runtime_env(".", {"A": "1"})
    assert {".venv/", "runs/", ".cache/", ".git/"} <= set(EXCLUDES) == set(env["excludes"])
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["env_vars"]["A"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"]


def test_auth_headers(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert auth_headers() == {}
    (tmp_path / "tok").write_text("abc\n")
    assert auth_headers(str(tmp_path / "tok")) == {"Authorization": "Bearer abc"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "xyz")
    assert auth_headers() == {"Authorization": "Bearer xyz"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head with its dashboard. `--block` + killing our own process group stops only this
    cluster (`ray stop` would kill every Ray on the machine, the session's shared one included)."""
    import signal
    import time

    from ray.job_submission import JobSubmissionClient

    temp = tmp_path_factory.mktemp("rayhead")
    port, dash = _port(), _port()
    # As from an activated venv: the job's `python` must be the one raystill is installed in.
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--port", str(port),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             "--include-dashboard", "true", "--num-cpus", "8", "--disable-usage-stats",
                             # Free ports: the session's own Ray may hold the agents' defaults already.
                             "--dashboard-agent-listen-port", str(_port()), "--dashboard-agent-grpc-port", str(_port()),
                             "--metrics-export-port", str(_port()), "--runtime-env-agent-port", str(_port()),
                             "--temp-dir", str(temp)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    token = Path.home() / ".ray" / "auth_token"
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else None
    deadline = time.time() + 180
    while True:
        try:
            JobSubmissionClient(address, headers=headers).list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("ray head did not come up")
            time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _cli(*args, timeout=420):
    token = Path.home() / ".ray" / "auth_token"
    extra = ["--auth-token-file", str(token)] if token.exists() else []
    return subprocess.run([sys.executable, "-m", "rayjobs.cli", *args, *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})


def _config(tmp_path, world, teacher) -> Path:
    cfg = {
        "name": "submit-test",
        "generation": {"teacher": teacher, "input": {"path": str(world.train_jsonl), "limit": 4},
                       "output": str(tmp_path / "gen"), "sampling": {"max_new_tokens": 8},
                       "engine": {"batch_size": 4, "max_model_len": 256}, "preprocess": {"keep": "all"}},
        "distillation": {"student": str(world.student_same_tokenizer), "output": str(tmp_path / "d")},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.slow
def test_submit_follow_succeeds_and_failure_is_reported(ray_head, tiny_world, tmp_path):
    good = _config(tmp_path, tiny_world, str(tiny_world.teacher))
    r = _cli("submit", str(good), "--stage", "generate", "--address", ray_head, "--follow")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout and "generation: done" in r.stdout
    assert (tmp_path / "gen" / "manifest.json").exists()

    (tmp_path / "bad").mkdir()
    bad = _config(tmp_path / "bad", tiny_world, str(tmp_path / "no-such-teacher"))
    r = _cli("submit", str(bad), "--stage", "generate", "--address", ray_head, "--follow")
    assert r.returncode == 2 and "generation.teacher" in r.stderr and "submitted" not in r.stdout  # preflight
    r = _cli("submit", str(bad), "--stage", "generate", "--address", ray_head, "--follow", "--skip-preflight")
    assert r.returncode == 1 and "FAILED" in r.stdout
    sid = r.stdout.split("submitted ", 1)[1].split()[0]
    status = _cli("jobs", "status", sid, "--address", ray_head)
    assert status.returncode == 0 and "FAILED" in status.stdout
    listing = _cli("jobs", "list", "--address", ray_head)
    assert sid in listing.stdout


def test_credentials_never_leave_the_laptop_but_every_source_file_does():
    """With the matcher Ray's runtime_env packaging applies to ``excludes`` (gitignore patterns)."""
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(ROOT, EXCLUDES)
    for secret in ("k8s/secrets.example.env", ".env", ".env.local", "keys/tls.pem", "id.key", "ray.token",
                   "hf_token", "credentials", ".aws/credentials", ".netrc", "gcp-credentials.json"):
        assert excluded(ROOT / secret), secret
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    sources = [ROOT / p for p in tracked.stdout.split()]
    assert sources and not [s for s in sources if excluded(s)]


def test_secret_looking_env_vars_are_refused():
    from pydantic import ValidationError

    from cluster.config import ClusterConfig

    assert ClusterConfig(env_vars={"OMP_NUM_THREADS": "1"}).env_vars == {"OMP_NUM_THREADS": "1"}
    for name in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "DB_PASSWORD", "api_key"):
        with pytest.raises(ValidationError, match="look like secrets"):
            ClusterConfig(env_vars={name: "x"})
