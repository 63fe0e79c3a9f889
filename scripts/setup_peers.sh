#!/usr/bin/env bash
# The peers' virtual environments for the side-by-side benchmarks (scripts/bench_gptq.py,
# scripts/bench_awq.py), apart from the project's .venv because their requirements differ:
#   .venv-peers/llmcompressor  llm-compressor (the benchmark drivers run on this one; they import
#                              compress from the checkout, so it also gets compress's own needs)
#   .venv-peers/gptqmodel      GPTQModel (bench_gptq.py --gptqmodel-python)
# torch is pinned and installed first in each (a bare torch requirement pulls a CUDA build of
# several GB). Safe to run again. Then, for example:
#   .venv-peers/llmcompressor/bin/python scripts/bench_gptq.py --jobs float,ours-sym,peer-sym,gptqmodel-sym \
#       --gptqmodel-python .venv-peers/gptqmodel/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
LLMCOMPRESSOR_VERSION=${LLMCOMPRESSOR_VERSION:-0.14.0.1}
GPTQMODEL_VERSION=${GPTQMODEL_VERSION:-7.6.0}
ROOT=${PEERS_DIR:-.venv-peers}

make_env() {  # name, packages...
  local dir="$ROOT/$1"
  shift
  if [ ! -x "$dir/bin/python" ]; then
    echo "== creating $dir"
    "$PYTHON" -m venv "$dir"
  fi
  local pip=("$dir/bin/python" -m pip --disable-pip-version-check -q)
  if ! "$dir/bin/python" -c "import torch" 2>/dev/null; then
    echo "== $dir: torch==$TORCH_VERSION"
    "${pip[@]}" install "torch==$TORCH_VERSION"
  fi
  echo "== $dir: $*"
  "${pip[@]}" install "$@"
}

# With compress itself (editable: the drivers and our jobs run the checkout's code), resolved together.
make_env llmcompressor "llmcompressor==$LLMCOMPRESSOR_VERSION" -e .
make_env gptqmodel "gptqmodel==$GPTQMODEL_VERSION"
echo "== done: $ROOT/llmcompressor/bin/python (drivers, llm-compressor), $ROOT/gptqmodel/bin/python (GPTQModel)"
