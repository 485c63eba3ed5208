"""The house rules, read from the code: imports point down, and pure cores import no engine.

Rooms, top to bottom: the entry points (``rayjobs/*.py``: jobs and CLI) may import anything;
the distillation stage (``rayjobs/distillation/``) imports ``cluster/``,
``datasets_pipeline.records``, the pure token cores both stages share and the teacher service's
client (``SHARED_CORES``) at most; ``service/`` and ``datasets_pipeline/`` import only
``cluster/``; ``cluster/`` imports no other project package. The demo world
(``rayjobs/demo/``) is reached only through the reference resolver (``rayjobs/refs.py``) and the
CLI's own ``demo`` commands.

Before the distillation stage got its room (#14) this test failed on four upward imports:
``service/app.py`` -> ``rayjobs/refs.py`` (-> ``rayjobs/demo/world.py``),
``rayjobs/kuberay.py`` -> ``rayjobs/config.py``, and ``rayjobs/distillation/checkpoints.py`` ->
``rayjobs/config.py`` (for ``ConfigError``), and ``cluster/storage.py`` knew the ``demo:`` scheme.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "service", "datasets_pipeline", "rayjobs")
ENGINES = ("ray", "deepspeed", "vllm")
# The cores every stage is built on: plain functions and classes, testable in milliseconds.
PURE = (
    "rayjobs.distillation.losses", "rayjobs.distillation.xtok", "rayjobs.distillation.feature_losses",
    "rayjobs.distillation.chunked_head",
    "rayjobs.distillation.collate", "rayjobs.distillation.schedule", "rayjobs.distillation.plan",
    "datasets_pipeline.alignment", "datasets_pipeline.prompts", "datasets_pipeline.targets",
    "datasets_pipeline.answers", "datasets_pipeline.assemble", "datasets_pipeline.topk", "datasets_pipeline.records",
    "datasets_pipeline.stats", "datasets_pipeline.vocab_cache",
    "service.llm_config", "service.guard", "service.errors", "service.limits", "service.score_codec",
    "service.score_client", "rayjobs.distillation.service_teacher",
    "cluster.config", "cluster.kv_cache", "datasets_pipeline.config", "service.config",
    "rayjobs.distillation.config", "rayjobs.config",
)


# What the distillation stage may use of datasets_pipeline: the record schema and the pure token
# cores both stages apply (rendering a prompt, aligning two tokenizers and caching their vocabulary
# map, parsing answers), never
# its Ray plumbing.
SHARED_CORES = ("datasets_pipeline.records", "datasets_pipeline.alignment", "datasets_pipeline.vocab_cache",
                "datasets_pipeline.targets", "datasets_pipeline.answers", "datasets_pipeline.prompts",
                # and of service/, the teacher scoring service's client (teacher.source: service), never its app
                "service.score_client")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def _allowed(importer: str, imported: str) -> bool:
    room = importer.split(".")[0]
    if imported.split(".")[0] == "cluster":
        return True
    if room == "cluster":
        return False
    if room in ("service", "datasets_pipeline"):
        return imported.split(".")[0] == room
    if importer.startswith("rayjobs.distillation"):
        return imported.startswith(("rayjobs.distillation",)) or imported in SHARED_CORES or \
            imported.rsplit(".", 1)[0] in SHARED_CORES
    if imported.startswith("rayjobs.demo"):
        return importer.startswith("rayjobs.demo") or importer in ("rayjobs.refs", "rayjobs.cli")
    if importer.startswith("rayjobs.demo"):
        return not imported.startswith("rayjobs.") or imported.startswith(("rayjobs.demo", "rayjobs.distillation"))
    return True  # entry points


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_import_points_down():
    upward = [f"{_module_name(p)} -> {imp}" for p in _sources() for imp in sorted(_project_imports(p))
              if not _allowed(_module_name(p), imp)]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_only_the_resolver_knows_the_demo_scheme():
    knowing = [str(p.relative_to(ROOT)) for p in _sources()
               if '"demo:' in p.read_text() and not _module_name(p).startswith(("rayjobs.demo", "rayjobs.refs"))]
    assert not knowing, f"modules that handle 'demo:' references themselves: {knowing}"


def _engines_loaded(modules: tuple[str, ...]) -> dict[str, list[str]]:
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            f"print(json.dumps([e for e in {list(ENGINES)!r} if e in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pure_cores_import_no_engine():
    """All pure modules in one fresh interpreter; on a failure, each alone to name the culprit."""
    if not _engines_loaded(PURE):
        return
    culprits = {m: loaded for m in PURE if (loaded := _engines_loaded((m,)))}
    assert not culprits, f"pure modules that import an engine: {culprits}"
