"""Shared argument handling for ``python -m rayjobs.<job> --config FILE [--set k=v ...]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cluster.errors import UserError
from datasets_pipeline.shards import ForeignOutput
from rayjobs.config import ConfigError, PipelineConfig, load_config


def run_job(description: str, job: Callable[[PipelineConfig], object], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="pipeline config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    args = parser.parse_args(argv)
    try:
        job(load_config(args.config, args.overrides))
    except (ConfigError, ForeignOutput, UserError) as e:  # in the file, or found once the data is read: the user's to fix
        print(f"error: {e}".replace("\n", "\nerror: "), file=sys.stderr)
        return 2
    return 0
