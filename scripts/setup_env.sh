#!/usr/bin/env bash
# Creates .venv (once) and installs autofit into it, with torch chosen for this machine.
# A machine with an NVIDIA driver gets the normal (CUDA) torch wheel; a machine without one
# gets torch 2.13.0, the version the CPU path is tested with. Set AUTOFIT_TORCH to override
# (e.g. AUTOFIT_TORCH="torch==2.5.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${AUTOFIT_TORCH:-}" ]; then spec="$AUTOFIT_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then spec="torch>=2.4"
  else spec="torch==2.13.0"; fi
  python -m pip install -q "$spec"
fi
python -m pip install -q -e ".[dev]"
