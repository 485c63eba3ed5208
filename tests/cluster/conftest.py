"""A real multi-node Ray cluster on loopback, shaped like our KubeRay one, for tests/cluster/test_multinode.py.

The head has ``num_cpus=0`` (as in k8s/); each worker node is its own ``ray start`` raylet with its
own custom resource (so placement is visible) and its own ``RAYSTILL_CACHE``, Hugging Face cache,
``TMPDIR`` and Ray temp dir, so a path one node wrote does not exist on another. S3 (moto's server)
is the only storage they share. Every process is started in its own session and killed by its own
process group: ``ray stop`` would also stop other people's clusters on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster.ports import free_port

RAY = str(Path(sys.executable).with_name("ray"))
WORKTREE = str(Path(__file__).resolve().parents[2])
# Token auth off, on the nodes and in every client: a token file left in ~/.ray by another cluster on this
# host would otherwise switch the head to token mode while the workers join without one.
CLIENT_ENV = {"RAY_AUTH_MODE": "disabled"}
# Ray Train gives a worker group 60 s to be placed; a replacement node joins more slowly than that on a
# loaded 2-core host (KubeRay's pod start is minutes: set it there too).
# And Ray's memory monitor off: every node would judge the whole host's memory, so one node's (or
# another user's) load would make all of them kill workers.
NODE_ENV = {**CLIENT_ENV, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600", "RAY_memory_monitor_refresh_ms": "0"}
# Enough logical CPUs per worker for one engine plus the Ray Data stages beside it.
WORKER_CPUS = 4


@dataclass
class Node:
    name: str
    root: Path
    proc: subprocess.Popen
    resources: dict = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return node_env(self.root)


def node_env(root: Path) -> dict[str, str]:
    """One node's disk: caches and temp dirs that no other node sees."""
    return {"RAYSTILL_CACHE": str(root / "raystill-cache"), "HF_HOME": str(root / "hf"),
            "TMPDIR": str(root / "tmp")}


def _agent_ports() -> list[str]:
    # Free ports: every raylet on one machine would otherwise take the same agent defaults.
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())]


class LoopbackCluster:
    """Head + worker nodes as ``ray start --block`` processes on this host; ``address`` is what RAY_ADDRESS
    gets (Ray maps 127.0.0.1 to the host's address itself, so the nodes register under that)."""

    def __init__(self, root: Path):
        self.root = root
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, Node] = {}
        self.temp_dirs: list[str] = []
        self.client_env = {"RAY_ADDRESS": self.address, **CLIENT_ENV}

    def _start(self, name: str, args: list[str]) -> Node:
        root = self.root / name
        for sub in ("raystill-cache", "hf", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **node_env(root), **NODE_ENV, "RAY_ADDRESS": "", "PYTHONPATH": WORKTREE,
               # As from an activated venv: a job's `python` must be the one raystill is installed in.
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        log = (root / "ray-start.log").open("wb")
        # Ray's own temp dir is short: its socket paths must stay under 108 bytes.
        ray_tmp = tempfile.mkdtemp(prefix=f"rs-{name}-", dir="/tmp")
        self.temp_dirs.append(ray_tmp)
        proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--temp-dir", ray_tmp,
                                 *_agent_ports(), *args],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, root, proc)
        self.nodes[name] = node
        return node

    def start_head(self) -> None:
        self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard", "true",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                             "--ray-client-server-port", str(free_port())])

    def add_worker(self, name: str, resources: dict) -> Node:
        node = self._start(name, ["--address", self.address, "--num-cpus", str(WORKER_CPUS),
                                  "--resources", json.dumps(resources)])
        node.resources = resources
        return node

    def wait_for(self, names: set[str], timeout_s: float = 240) -> None:
        """Until exactly the named worker nodes (and the head) are alive."""
        deadline = time.time() + timeout_s
        while self.alive_workers() != names:
            dead = [n for n in names if self.nodes[n].proc.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"nodes {sorted(names)} not up (alive: {sorted(self.alive_workers())}, "
                                   f"exited: {dead}); see {self.root}/*/ray-start.log")
            time.sleep(2)

    def alive_workers(self) -> set[str]:
        """Names of the worker nodes the GCS lists as alive (by their custom resource)."""
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        except Exception:  # the dashboard is not up yet
            return set()
        names = {r for n in nodes for r in (n.resources_total or {}) if r in self.nodes and r != "head"}
        return names

    def node_ids(self) -> dict[str, str]:
        """Ray node id -> our node name, for every worker node the cluster has known (dead ones too)."""
        from ray.util.state import list_nodes

        out = {}
        for n in list_nodes(address=self.dashboard, raise_on_missing_output=False):
            names = [r for r in (n.resources_total or {}) if r in self.nodes]
            if names:
                out[n.node_id] = names[0]
        return out

    @property
    def head_id(self) -> str:
        """The head's Ray node id (the node without one of our resources)."""
        from ray.util.state import list_nodes

        return next(n.node_id for n in list_nodes(address=self.dashboard, filters=[("is_head_node", "=", True)],
                                                  raise_on_missing_output=False))

    def kill(self, name: str) -> None:
        """Kill one node's raylet and everything it started (its process group), as a lost pod."""
        node = self.nodes.pop(name)
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.proc.wait()

    def shutdown(self) -> None:
        """Workers first, then the head; each by its own process group."""
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            if name in self.nodes:
                node = self.nodes[name]
                try:
                    os.killpg(node.proc.pid, signal.SIGTERM)
                    node.proc.wait(timeout=30)
                except ProcessLookupError:
                    pass
                except subprocess.TimeoutExpired:
                    os.killpg(node.proc.pid, signal.SIGKILL)
                    node.proc.wait()
                self.nodes.pop(name)
        for path in self.temp_dirs:
            shutil.rmtree(path, ignore_errors=True)


WORKERS = {"node_a": {"node_a": 1, "vllm": 1}, "node_b": {"node_b": 1, "vllm": 1}}


@pytest.fixture(scope="module")
def loopback_cluster(s3_server, tmp_path_factory):
    """The cluster for the whole multinode module: a 0-CPU head and two worker nodes (``WORKERS``)."""
    cluster = LoopbackCluster(tmp_path_factory.mktemp("loopback"))
    try:
        cluster.start_head()
        for name, resources in WORKERS.items():
            cluster.add_worker(name, resources)
        cluster.wait_for(set(WORKERS))
        yield cluster
    finally:
        cluster.shutdown()
