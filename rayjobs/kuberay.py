"""The RayService's ``serveConfigV2``, generated from the pipeline config.

The Serve application on Kubernetes must serve exactly what the pipeline config says
(model, autoscaling, limits, API key variable), so the manifest's ``serveConfigV2`` block
is rendered from the config and never edited by hand::

    python -m rayjobs.kuberay --config examples/configs/k8s.yaml            # base manifest
    python -m rayjobs.kuberay --all --config examples/configs/k8s.yaml      # every manifest
    python -m rayjobs.kuberay --all --check                                 # exit 1 if stale

Each generated manifest records its source in two annotations (the config path, relative
to the repository root, and the ``--set`` overrides), so ``--all`` and the tests can
re-render it. The block is replaced in the text, which keeps the manifest's comments;
the result is parsed back and checked. Pure: PyYAML and the config models, no Ray.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from rayjobs.config import PipelineConfig

DEFAULT_CONFIG = "examples/configs/k8s.yaml"
DEFAULT_MANIFEST = "k8s/base/rayservice.student.yaml"
APP_NAME = "raystill"
APP_IMPORT_PATH = "service.app:build_app"
TEACHER_APP_NAME = "raystill-teacher"
TEACHER_IMPORT_PATH = "service.teacher:build_app"
SOURCE_ANNOTATION = "raystill.io/serve-config"
OVERRIDES_ANNOTATION = "raystill.io/serve-config-overrides"
# Which application a manifest serves: the student endpoint (default) or the teacher scoring service.
APP_ANNOTATION = "raystill.io/serve-app"
APPS = ("student", "teacher")

_BLOCK = re.compile(r"^(?P<indent>[ \t]*)serveConfigV2:[ \t]*\|[-+]?[ \t]*\n", re.MULTILINE)


def serve_config(cfg: PipelineConfig, app: str = "student") -> dict:
    """The Serve deploy config (what ``serve deploy`` takes) for the student endpoint (``serving``)
    or the teacher scoring service (``teacher_service``)."""
    if app == "teacher":
        endpoint, name, prefix, import_path = (cfg.teacher_service, TEACHER_APP_NAME, cfg.teacher_service.route_prefix,
                                               TEACHER_IMPORT_PATH)
    else:
        endpoint, name, prefix, import_path = cfg.serving, APP_NAME, "/", APP_IMPORT_PATH
    return {
        # The head has num-cpus 0; a proxy on every node lets the serve Service reach workers.
        "proxy_location": "EveryNode",
        # In a pod the proxy must listen on all interfaces; the config's host is for local runs.
        "http_options": {"host": "0.0.0.0", "port": endpoint.port},
        "applications": [
            {
                "name": name,
                "route_prefix": prefix,
                "import_path": import_path,
                "args": endpoint.model_dump(mode="json"),
                "runtime_env": {"env_vars": dict(sorted(cfg.cluster.env_vars.items()))},
            }
        ],
    }


def render_serve_config_v2(cfg: PipelineConfig, app: str = "student") -> str:
    """``spec.serveConfigV2`` as KubeRay wants it: a YAML document in a string."""
    return yaml.safe_dump(serve_config(cfg, app), sort_keys=False, default_flow_style=False, width=4096)


def render_for(config: str | Path, overrides: list[str] | None = None, app: str = "student") -> str:
    from rayjobs.config import load_config

    return render_serve_config_v2(load_config(config, overrides or []), app)


def manifest_app(doc: dict) -> str:
    """The application a generated manifest serves (its ``raystill.io/serve-app`` annotation, else the student)."""
    app = ((doc.get("metadata") or {}).get("annotations") or {}).get(APP_ANNOTATION, "student")
    if app not in APPS:
        raise ValueError(f"{APP_ANNOTATION} must be one of {APPS}, got {app!r}")
    return app


def manifest_source(doc: dict) -> tuple[str, list[str]]:
    """(config path, overrides) recorded in a generated manifest's annotations."""
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    if SOURCE_ANNOTATION not in annotations:
        raise ValueError(f"manifest has no {SOURCE_ANNOTATION} annotation")
    return annotations[SOURCE_ANNOTATION], json.loads(annotations.get(OVERRIDES_ANNOTATION, "[]"))


def _replace_annotation(text: str, key: str, value: str) -> str:
    pattern = re.compile(rf"^(?P<indent>[ \t]*){re.escape(key)}:.*$", re.MULTILINE)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"expected exactly one '{key}:' annotation line")
    # Single-quoted YAML needs no escapes but doubled quotes; a JSON string is valid double-quoted YAML.
    scalar = f"'{value}'" if "'" not in value and "\n" not in value else json.dumps(value)
    return pattern.sub(lambda m: f"{m['indent']}{key}: {scalar}", text)


def _replace_block(text: str, rendered: str) -> str:
    matches = list(_BLOCK.finditer(text))
    if len(matches) != 1:
        raise ValueError("expected exactly one 'serveConfigV2: |' block scalar")
    m = matches[0]
    key_indent = len(m["indent"].expandtabs())
    end = m.end()
    lines = text[end:].splitlines(keepends=True)
    consumed = 0
    for line in lines:  # the block runs until a non-blank line indented no deeper than the key
        if line.strip() and len(line) - len(line.lstrip()) <= key_indent:
            break
        consumed += len(line)
    body = "".join(" " * (key_indent + 2) + line if line.strip() else line for line in rendered.splitlines(True))
    return text[:end] + body + text[end + consumed:]


def update_manifest_text(text: str, rendered: str, config: str, overrides: list[str]) -> str:
    """``text`` with its serveConfigV2 block and source annotations replaced, checked by re-parsing."""
    new = _replace_block(text, rendered)
    new = _replace_annotation(new, SOURCE_ANNOTATION, config)
    new = _replace_annotation(new, OVERRIDES_ANNOTATION, json.dumps(overrides))
    doc = yaml.safe_load(new)
    if doc["spec"]["serveConfigV2"] != rendered or manifest_source(doc) != (config, overrides):
        raise ValueError("rewritten manifest does not parse back to the rendered serve config")
    return new


def write_rayservice(
    manifest: str | Path,
    config: str,
    overrides: list[str] | None = None,
    *,
    root: Path = Path("."),
    check: bool = False,
) -> bool:
    """Regenerate one manifest's serveConfigV2; returns True if it changed (or, with check, would)."""
    overrides = list(overrides or [])
    path = root / manifest
    text = path.read_text()
    app = manifest_app(next(d for d in yaml.safe_load_all(text) if d))
    new = update_manifest_text(text, render_for(root / config, overrides, app), config, overrides)
    if new != text and not check:
        path.write_text(new)
    return new != text


def generated_manifests(root: Path) -> list[Path]:
    """Every YAML file under k8s/ that carries a generated serveConfigV2 (base and overlay patches)."""
    found = []
    for path in sorted((root / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and SOURCE_ANNOTATION in ((doc.get("metadata") or {}).get("annotations") or {}):
                found.append(path)
                break
    return found


def main(argv: list[str] | None = None) -> int:
    from cluster.errors import ConfigError

    p = argparse.ArgumentParser(prog="python -m rayjobs.kuberay", description=__doc__.splitlines()[0])
    p.add_argument("--config", help=f"pipeline config, relative to the repo root (default {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    p.add_argument("--manifest", default=DEFAULT_MANIFEST, help="RayService manifest (or patch) to rewrite")
    p.add_argument("--all", action="store_true", help="every generated manifest under k8s/, each from its annotations")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if any manifest is stale")
    p.add_argument("--root", type=Path, default=Path("."), help="repository root (default: current directory)")
    args = p.parse_args(argv)

    if args.all:
        if args.overrides:
            p.error("--all keeps each manifest's own overrides; --set applies to one --manifest")
        jobs = []
        for path in generated_manifests(args.root):
            config, overrides = manifest_source(next(d for d in yaml.safe_load_all(path.read_text()) if d))
            jobs.append((path.relative_to(args.root), args.config or config, overrides))
    else:
        jobs = [(Path(args.manifest), args.config or DEFAULT_CONFIG, args.overrides)]

    stale = []
    for manifest, config, overrides in jobs:
        try:
            changed = write_rayservice(manifest, config, overrides, root=args.root, check=args.check)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
        if changed:
            stale.append(str(manifest))
        print(f"{manifest}: {'stale' if args.check and changed else 'updated' if changed else 'up to date'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
