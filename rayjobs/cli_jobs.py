"""``raystill submit`` and ``raystill jobs ...``: run on a remote Ray cluster from a laptop."""

from __future__ import annotations

import argparse
import os

from cluster import submit as sub

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _address(args) -> str:
    return args.address or os.environ.get("RAY_JOB_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _conn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help=f"Ray dashboard URL (default: $RAY_JOB_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--auth-token-file", default=None,
                   help="Ray auth token file for clusters with token auth (default: $RAY_AUTH_TOKEN)")


def _exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def _cmd_submit(args) -> int:
    from rayjobs.config import load_config
    from rayjobs.preflight import run_preflight

    cfg = load_config(args.config, args.overrides)
    if not args.skip_preflight:
        # The job's working_dir is uploaded from here, so its relative paths resolve as they will there.
        run_preflight(cfg, args.config, "run" if args.stage == "pipeline" else args.stage)
    sid = sub.submit(cfg, _address(args), stage=args.stage, working_dir=args.working_dir,
                     token_file=args.auth_token_file)
    print(f"submitted {sid} to {_address(args)}")
    print(f"  follow: raystill jobs logs {sid} --follow --address {_address(args)}")
    if not args.follow:
        return 0
    status = sub.follow(sub.client(_address(args), args.auth_token_file), sid)
    print(f"job {sid}: {status}")
    return _exit_code(status)


def _cmd_status(args) -> int:
    c = sub.client(_address(args), args.auth_token_file)
    info = c.get_job_info(args.submission_id)
    print(f"{args.submission_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    return 0


def _cmd_logs(args) -> int:
    c = sub.client(_address(args), args.auth_token_file)
    if args.follow:
        status = sub.follow(c, args.submission_id)
        print(f"job {args.submission_id}: {status}")
        return _exit_code(status)
    print(c.get_job_logs(args.submission_id), end="")
    return 0


def _cmd_stop(args) -> int:
    stopped = sub.client(_address(args), args.auth_token_file).stop_job(args.submission_id)
    print(f"{args.submission_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _cmd_list(args) -> int:
    jobs = sub.client(_address(args), args.auth_token_file).list_jobs()
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        print(f"{j.submission_id or j.job_id:<48} {j.status.value:<10} {j.entrypoint}")
    return 0


def register(subparsers, config_args) -> None:
    p = subparsers.add_parser("submit", help="submit the pipeline (or one stage) as a Ray job")
    config_args(p)
    _conn_args(p)
    p.add_argument("--stage", default="pipeline", choices=sub.STAGES, help="what to run (default: pipeline)")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir (default: .)")
    p.add_argument("--follow", action="store_true", help="stream logs until the job ends; exit 1 if it failed")
    p.add_argument("--skip-preflight", action="store_true",
                   help="submit without checking references here (paths that exist only on the cluster's nodes)")
    p.set_defaults(func=_cmd_submit)

    jobs = subparsers.add_parser("jobs", help="inspect Ray jobs").add_subparsers(dest="action", required=True)
    for name, fn, helptext in (("status", _cmd_status, "status of a job"), ("logs", _cmd_logs, "a job's logs"),
                               ("stop", _cmd_stop, "stop a job")):
        q = jobs.add_parser(name, help=helptext)
        q.add_argument("submission_id")
        _conn_args(q)
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends")
        q.set_defaults(func=fn)
    q = jobs.add_parser("list", help="all jobs on the cluster")
    _conn_args(q)
    q.set_defaults(func=_cmd_list)
