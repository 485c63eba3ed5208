"""Shared argument handling for ``python -m rayjobs.<job> --config FILE [--set k=v ...]``, and the
one place a user error becomes an exit code (the CLI uses it too)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cluster.errors import UserError
from rayjobs.config import PipelineConfig, load_config

USER_ERROR_EXIT = 2


def exit_code(call: Callable[[], int | None], debug: bool = False) -> int:
    """Run ``call``; a ``UserError`` (config, preflight, foreign output, resume guard, KV size, ...)
    prints ``error: ...`` lines and gives exit 2, never a traceback (unless ``debug``)."""
    try:
        return call() or 0
    except UserError as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {e}".replace("\n", "\nerror: "), file=sys.stderr)
        return USER_ERROR_EXIT


def run_job(description: str, job: Callable[[PipelineConfig], object], command: str,
            argv: list[str] | None = None) -> int:
    """``python -m rayjobs.<job>``: parse, preflight ``command``'s references, run."""
    from rayjobs.preflight import run_preflight

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="pipeline config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    args = parser.parse_args(argv)

    def _run() -> None:
        cfg = load_config(args.config, args.overrides)
        run_preflight(cfg, args.config, command)
        job(cfg)

    return exit_code(_run, debug=args.debug)
