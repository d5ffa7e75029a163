#!/usr/bin/env bash
# The README's test command: sets up .venv, then runs the test suite (CPU tests; `cuda` tests
# run only where a GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
