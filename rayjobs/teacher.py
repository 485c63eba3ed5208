"""Job: the teacher scoring service (``raystill teacher serve FILE``, ``python -m rayjobs.teacher --config FILE``).

Deploys ``service.teacher`` as its own Serve application (``teacher_service`` section; the model
defaults to ``generation.teacher``) beside, not instead of, the student endpoint: it answers at
``<route_prefix>/v1/token_scores`` on the same Serve proxy. With ``block`` it serves until Ctrl-C,
otherwise it returns the base URL and leaves the application running (tests, distillation runs).
"""

from __future__ import annotations

import sys

from rayjobs.config import PipelineConfig
from rayjobs.entry import run_job
from rayjobs.kuberay import TEACHER_APP_NAME  # one name, locally and in the RayService
from rayjobs.serve import StopSignals, deploy, serve_until_stopped


def run(cfg: PipelineConfig, log=print, block: bool = True) -> str:
    from service.teacher import build_app

    t = cfg.teacher_service
    deploy(cfg, t, build_app, TEACHER_APP_NAME, t.route_prefix, log)
    url = t.local_url()
    stop = StopSignals() if block else None
    log(f"teacher {t.model_id} scoring at {url}/v1/token_scores (top_k <= {t.limits.max_top_k})")
    if not block:
        return url
    raise SystemExit(serve_until_stopped(cfg, log, TEACHER_APP_NAME, stop))


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, run, "teacher", argv)


if __name__ == "__main__":
    sys.exit(main())
