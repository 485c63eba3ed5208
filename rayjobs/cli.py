"""The ``raystill`` command line.

Every command that takes a config accepts ``--set PATH=VALUE`` overrides. Config
problems print one line per problem and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from rayjobs.config import load_config
from rayjobs.entry import exit_code
from rayjobs.preflight import run_preflight


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline config YAML (see examples/configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a field, e.g. --set distillation.optim.lr=1e-4 (repeatable)",
    )


def _kv_cache_lines(cfg) -> list[str]:
    """The KV cache each engine will get, as comment lines (derived sizes depend on the model)."""
    from cluster.storage import follow_release
    from datasets_pipeline.engine import kv_cache_size as generation_kv
    from rayjobs.refs import existing_model
    from service.llm_config import kv_cache_size as serving_kv

    lines = []
    for setting, ref, size in (
        ("generation.engine.kv_cache_gib", cfg.generation.teacher, lambda m: generation_kv(cfg.generation, m)),
        ("serving.kv_cache_gib", cfg.serving.model, lambda m: serving_kv(cfg.serving, m)),
    ):
        if setting.startswith("generation.") and not cfg.generation.runs_engine:
            lines.append(f"# {setting}: unused, the samples are supplied ({cfg.generation.input.response_field}) "
                         "and no engine runs")
            continue
        model = existing_model(ref)
        if model is None:
            lines.append(f"# {setting}: derived when the engine starts, from {ref} (not there yet)")
            continue
        kv = size(follow_release(model))
        resolved = "unset: vLLM's gpu_memory_utilization (GPU)" if kv is None else f"{kv.gib:.4f} ({kv.how})"
        lines.append(f"# {setting} resolved: {resolved}")
    return lines


def _cmd_config_show(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.explain:
        from rayjobs.config import explain

        print(explain(cfg))
        return 0
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    print("\n".join(_kv_cache_lines(cfg)))
    return 0


def _cmd_config_validate(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.check_refs:
        run_preflight(cfg, args.config, "run")
    print(f"{args.config}: OK (run '{cfg.name}', config digest {cfg.digest()})")
    return 0


def _checked(args, command: str):
    """The config of a command that runs something, after its preflight passed (a student derived
    from the teacher, ``distillation.student_init``, is built first: the preflight checks it)."""
    cfg = load_config(args.config, args.overrides)
    if command in ("generate", "distill", "run"):
        from rayjobs.student import ensure

        ensure(cfg)
    run_preflight(cfg, args.config, command)
    return cfg


def _cmd_generate(args) -> int:
    from rayjobs.generate import run

    run(_checked(args, "generate"))
    return 0


def _cmd_distill(args) -> int:
    from rayjobs.distill import run

    run(_checked(args, "distill"))
    return 0


def _cmd_serve(args) -> int:
    from rayjobs.serve import run

    run(_checked(args, "serve"))
    return 0


def _cmd_teacher_serve(args) -> int:
    from rayjobs.teacher import run

    run(_checked(args, "teacher"))
    return 0


def _cmd_student_init(args) -> int:
    from rayjobs.student import main_init

    return main_init(load_config(args.config, args.overrides))


def _cmd_run(args) -> int:
    import os

    from rayjobs.pipeline import GateFailed, run

    cfg = _checked(args, "run")
    block = not (args.exit or os.environ.get("DEMO_EXIT") == "1")
    try:
        run(cfg, serve=not args.no_serve, block=block)
    except GateFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


def _cmd_demo_prepare(args) -> int:
    if args.world == "r1-qwen":
        return _prepare_r1(args)
    from rayjobs.demo.world import prepare

    world = prepare(args.cache_dir)
    print(f"demo world ready at {world.root}")
    print(f"  teacher:  {world.teacher}  (held-out EM {world.teacher_em:.3f})")
    print(f"  student:  {world.student}")
    print(f"  student (teacher's tokenizer): {world.student_same_tokenizer}")
    print(f"  prompts:  {world.train_jsonl}, {world.heldout_jsonl}")
    return 0


def _prepare_r1(args) -> int:
    from rayjobs.demo.r1_world import R1_REFS, prepare_r1

    world = prepare_r1(args.cache_dir)
    print(f"r1-qwen world ready at {world.root} (built in {world.info['build_seconds']:.0f}s)")
    print(f"  teacher:  {world.teacher}  (R1 tokenizer, {world.info['teacher']['vocab_size']:,} rows, "
          f"held-out EM {world.teacher_em:.3f})")
    print(f"  student:  {world.student}  (Qwen2.5 tokenizer, {world.info['student']['vocab_size']:,} rows)")
    print(f"  prompts:  {world.train_jsonl}, {world.heldout_jsonl}")
    print(f"  references: {', '.join(R1_REFS)}")
    return 0


def _cmd_demo_eval(args) -> int:
    from rayjobs.demo.evaluate import exact_match
    from rayjobs.demo.world import prepare

    world = prepare(args.cache_dir, progress=(lambda *_: None) if args.json else print)
    result = {"n": None}
    for key, model in (("teacher", world.teacher), ("student", world.student),
                       ("student_same_tokenizer", world.student_same_tokenizer)):
        r = exact_match(model, world.heldout_jsonl, limit=args.limit)
        result[f"{key}_em"] = r["em"]
        result["n"] = r["n"]
        if not args.json:
            print(f"{key:>24}: EM {r['em']:.3f} on {r['n']} held-out prompts ({r['tokens_per_s']:.0f} tokens/s)")
    if args.json:
        print(json.dumps(result))
    return 0


def _config_command(sub, name: str, helptext: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=helptext)
    _config_args(p)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raystill", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect and check pipeline configs").add_subparsers(
        dest="action", required=True
    )
    show = _config_command(config, "show", "print the resolved config (defaults and overrides applied)",
                           _cmd_config_show)
    show.add_argument("--explain", action="store_true", help="every field with its value and what it does")
    validate = _config_command(config, "validate", "check a config; exit 2 with one line per problem",
                               _cmd_config_validate)
    validate.add_argument("--check-refs", action="store_true",
                          help="also check every model, input and output it names (the preflight), start nothing")
    _config_command(sub, "generate", "teacher generation + preprocessing into Parquet shards", _cmd_generate)
    _config_command(sub, "serve", "serve the student behind an OpenAI-compatible endpoint (Ctrl-C stops)", _cmd_serve)
    teacher = sub.add_parser("teacher", help="the teacher scoring service").add_subparsers(dest="action", required=True)
    _config_command(teacher, "serve", "serve the teacher's per-token log-probs and top-k of given token ids "
                    "(Ctrl-C stops)", _cmd_teacher_serve)
    _config_command(sub, "distill", "train the student on the generated shards (Ray Train + DeepSpeed), merge, evaluate",
                    _cmd_distill)
    student = sub.add_parser("student", help="the student model").add_subparsers(dest="action", required=True)
    _config_command(student, "init", "derive the student from the teacher (distillation.student_init): kept "
                    "blocks, embeddings, norms and head, optionally narrower MLPs; a plain HF model", _cmd_student_init)
    run = _config_command(sub, "run", "the whole loop: generate, distill, merge, evaluate, serve, query", _cmd_run)
    run.add_argument("--exit", action="store_true", help="exit after the test query instead of serving (DEMO_EXIT=1)")
    run.add_argument("--no-serve", action="store_true", help="stop after evaluation and the gate")

    from rayjobs import cli_jobs

    cli_jobs.register(sub, _config_args)

    demo = sub.add_parser("demo", help="the offline demo world (tiny teacher, students, task)").add_subparsers(
        dest="action", required=True
    )
    prep = demo.add_parser("prepare", help="build the demo world, or reuse the cached one")
    prep.add_argument("--cache-dir", default=None, help="default: $RAYSTILL_CACHE or ~/.cache/raystill")
    prep.add_argument("--world", choices=("toy", "r1-qwen"), default="toy",
                      help="toy: 17-symbol BPEs (demo:*); r1-qwen: DeepSeek-R1's and Qwen2.5's real "
                           "tokenizers and vocabularies (demo:r1-*)")
    prep.set_defaults(func=_cmd_demo_prepare)
    ev = demo.add_parser("eval", help="held-out exact match of the demo teacher and students")
    ev.add_argument("--cache-dir", default=None)
    ev.add_argument("--limit", type=int, default=None, help="evaluate on the first N held-out prompts")
    ev.add_argument("--json", action="store_true", help="print one JSON line")
    ev.set_defaults(func=_cmd_demo_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
