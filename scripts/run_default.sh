#!/usr/bin/env bash
# The main job on the embedded defaults: set up, then run the default recipe.
# Extra arguments go to `compress run` (e.g. --device cuda, --output DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RECIPE=${RECIPE:-recipes/smollm2-gptq-w4g128.yaml}
exec .venv/bin/compress run "$RECIPE" --overwrite "$@"
