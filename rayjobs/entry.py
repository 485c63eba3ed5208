"""Shared argument handling for ``python -m rayjobs.<job> --config FILE [--set k=v ...]``, and the
one place a user error becomes an exit code (the CLI uses it too)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cluster.errors import UserError
from rayjobs.config import PipelineConfig, load_config

USER_ERROR_EXIT = 2


def exit_code(call: Callable[[], int | None]) -> int:
    """Run ``call``; a ``UserError`` (config, foreign output, resume guard, KV size, ...) prints
    ``error: ...`` lines and gives exit 2, never a traceback."""
    try:
        return call() or 0
    except UserError as e:
        print(f"error: {e}".replace("\n", "\nerror: "), file=sys.stderr)
        return USER_ERROR_EXIT


def run_job(description: str, job: Callable[[PipelineConfig], object], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="pipeline config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    args = parser.parse_args(argv)
    return exit_code(lambda: job(load_config(args.config, args.overrides)) and 0)
