"""``raystill serve`` stops on Ctrl-C and SIGTERM (#17, item 6): exit 130 / 143, and every process
it started (Ray, the Serve replica, the vLLM engine) is gone afterwards. Before, the server was
still running ten seconds after Ctrl-C.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.ports import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _config(world, tmp: Path) -> Path:
    cfg = {"name": "sig", "generation": {"teacher": str(world.teacher), "input": {"path": str(world.train_jsonl)},
                                         "output": str(tmp / "gen")},
           "distillation": {"student": str(world.student), "output": str(tmp / "distill")},
           "serving": {"model": str(world.student), "port": free_port(), "api_key_env": None,
                       "max_model_len": 128, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_on_signal_with_everything_it_started(tiny_world, tmp_path, signum, code):
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "rayjobs.cli", "serve", str(_config(tiny_world, tmp_path))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("serving "):
            break
    assert proc.poll() is None, "".join(lines)[-3000:]
    started = psutil.Process(proc.pid).children(recursive=True)
    assert started
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, ("".join(lines) + out)[-3000:]
    assert "stopping the endpoint" in out and "stopped:" in out
    deadline = time.monotonic() + 60
    while [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] and time.monotonic() < deadline:
        time.sleep(1)
    left = [f"{p.pid} {p.name()}" for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left
