#!/usr/bin/env bash
# Set up everything, safe to run again: a virtual environment in .venv, torch pinned
# FIRST (a bare torch requirement would pull a multi-GB CUDA build), the package with
# its eval and dev extras, then the embedded model and corpus into the cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "== installing torch==$TORCH_VERSION"
  "${PIP[@]}" install --upgrade pip
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
echo "== installing compress and its dependencies"
"${PIP[@]}" install -e ".[eval,dev]"
echo "== fetching the embedded model and corpus (cached in \${COMPRESS_CACHE:-~/.cache/compress})"
.venv/bin/compress fetch
