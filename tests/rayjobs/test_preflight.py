"""Preflight (#25): each wrong reference is one line and exit 2, before any Ray process starts.

Models here are directories with a hand-written config.json and tokenizer files (what the check
reads); the CLI runs in a fresh interpreter, which must not even have imported Ray when it exits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
        for i in range(3)]


def _model(path: Path, vocab: int = 100, tokenizer: bool = True) -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "vocab_size": vocab,
                                                  "max_position_embeddings": 256}))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return str(path)


@pytest.fixture
def world(tmp_path):
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"teacher": _model(tmp_path / "teacher", 129280), "student": _model(tmp_path / "student", 151936),
            "input": str(inp), "tmp": tmp_path}


def _config(world, **sets) -> Path:
    cfg = {"name": "pf", "generation": {"teacher": world["teacher"], "input": {"path": world["input"]},
                                        "output": str(world["tmp"] / "gen")},
           "distillation": {"student": world["student"], "output": str(world["tmp"] / "distill")}}
    path = world["tmp"] / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(args: list[str], env: dict | None = None) -> tuple[int, list[str], bool]:
    """(exit code, stderr lines, whether Ray was imported) of ``raystill ARGS`` in a fresh interpreter."""
    code = ("import sys\nfrom rayjobs.cli import main\nrc = main(sys.argv[1:])\n"
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY')\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stderr.strip().splitlines(), "RAY_IMPORTED" in proc.stdout


def _generate(world, *sets: str, env=None):
    args = ["generate", str(_config(world))]
    for s in sets:
        args += ["--set", s]
    return _cli(args, env)


def _one_error(result, field: str, *words: str) -> None:
    rc, lines, ray_imported = result
    assert rc == 2 and not ray_imported, (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("error: ") and f": {field}: " in lines[0], lines
    assert all(w in lines[0] for w in words), lines


def test_preflight_missing_input(world):
    _one_error(_generate(world, "generation.input.path=/nonexistent/prompts.jsonl"), "generation.input.path",
               "not found", "/nonexistent/prompts.jsonl")


def test_preflight_missing_teacher(world):
    _one_error(_generate(world, "generation.teacher=/nonexistent/teacher"), "generation.teacher", "/nonexistent/teacher")


def test_preflight_directory_without_config_json(world):
    (world["tmp"] / "empty").mkdir()
    _one_error(_generate(world, f"generation.teacher={world['tmp'] / 'empty'}"), "generation.teacher", "no config.json")


def test_preflight_model_without_tokenizer(world):
    bare = _model(world["tmp"] / "bare", tokenizer=False)
    _one_error(_generate(world, f"distillation.student={bare}"), "distillation.student", "no tokenizer")


def test_preflight_hub_id_absent_from_offline_cache(world):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(world["tmp"] / "hub")}
    _one_error(_generate(world, "distillation.student=acme/not-there", env=env), "distillation.student",
               "acme/not-there", "HF_HUB_OFFLINE=1")


def test_preflight_hub_id_in_an_offline_cache_passes(world):
    """A hub cache laid out as the hub lays it out: models--org--name/snapshots/<rev>/..."""
    snap = world["tmp"] / "hub" / "models--acme--student" / "snapshots" / "0123abc"
    _model(snap, 151936)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abc")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(world["tmp"] / "hub")}
    code = ("import sys\nfrom rayjobs.config import load_config\nfrom rayjobs.preflight import run_preflight\n"
            f"run_preflight(load_config({str(_config(world))!r}, ['distillation.student=acme/student']), 'c.yaml', 'generate')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distillation.student: Qwen2ForCausalLM, vocab 151936" in proc.stdout


def test_preflight_rows_lack_the_mapped_field(world):
    _one_error(_generate(world, "generation.input.messages_field=conversation"), "generation.input.path",
               "missing field 'conversation'", "row keys")


def test_preflight_output_of_another_config(world):
    progress = world["tmp"] / "gen" / "progress"
    progress.mkdir(parents=True)
    (progress / "part-00000.json").write_text(json.dumps({"shard": 0, "done": [], "dedupe_keys": [], "counts": {},
                                                          "config_digest": "someoneelse"}))
    _one_error(_generate(world), "generation.output", "another generation config")


def test_preflight_reports_every_problem_at_once(world):
    rc, lines, ray_imported = _generate(world, "generation.teacher=/nope/t", "generation.input.path=/nope/in.jsonl")
    assert rc == 2 and not ray_imported and len(lines) == 2, lines


def test_preflight_config_validate_check_refs(world):
    rc, lines, ray_imported = _cli(["config", "validate", str(_config(world)), "--check-refs",
                                    "--set", "generation.teacher=/nope/t"])
    assert rc == 2 and not ray_imported and "generation.teacher" in lines[0]


def test_preflight_unreadable_s3_prefix(world, s3_server):
    s3_server.create_bucket(Bucket="preflight")
    _one_error(_generate(world, "generation.teacher=s3://preflight/no/such/model"), "generation.teacher",
               "no config.json", "s3://preflight/no/such/model")
    _one_error(_generate(world, "generation.output=s3://no-such-bucket-pf/gen"), "generation.output",
               "bucket s3://no-such-bucket-pf does not exist")
