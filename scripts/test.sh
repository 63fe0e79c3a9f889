#!/usr/bin/env bash
# Set up, lint, and run the test suite (unit tests on tiny random models, plus a few
# integration tests on the embedded model and corpus). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
.venv/bin/ruff check compress tests scripts eval
.venv/bin/python -m pytest -q --durations=15 "$@"
