#!/usr/bin/env bash
# The README's main job: set up .venv, then `autofit run` with the built-in default (the tiny
# preset on the embedded dataset; probed first on this machine's GPU, or on the budgeted CPU
# device when there is none). Extra arguments go to `autofit run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/autofit run --out out/default "$@"
