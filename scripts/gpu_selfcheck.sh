#!/usr/bin/env bash
# GPU self-check: one command on a machine with an NVIDIA GPU (about 5-8 minutes on an H100).
#   bash scripts/gpu_selfcheck.sh OUT_DIR
# 1. runs the cuda-marked tests;
# 2. probes GPT-2 124M at the seed config's batch shape (16 x 32 sequences of 1024 tokens, bf16,
#    compile) while emulating an rtx4070-12gb (this process capped to the 4070's memory), saves
#    the plan and trains 60 steps with torch.compile switched on at step 30 and an OOM injected
#    at step 40;
# 3. prints estimated vs measured peak per trial, the plan, tokens/s and MFU against this card's
#    real peak, whether compile switched on at 30, the OOM at 40 was survived and all 60 steps
#    finished; writes the same as JSON to OUT_DIR/selfcheck.json.
# Set AUTOFIT_SKIP_SETUP=1 where autofit and a CUDA torch are installed already (offline machines).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-selfcheck-out}
rm -rf "$OUT/run" "$OUT/home" "$OUT/selfcheck.json"  # a rerun starts clean: no saved plan, no old metrics
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ "${AUTOFIT_SKIP_SETUP:-0}" = 1 ] || python3 -c "import autofit, torch" 2>/dev/null; then
  PY=$(command -v python3); AUTOFIT="$PY -m autofit.cli"
else
  bash scripts/setup_env.sh || exit 1
  PY=.venv/bin/python; AUTOFIT="$PY -m autofit.cli"
fi
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || {
  echo "gpu_selfcheck: torch $($PY -c 'import torch; print(torch.__version__)') sees no CUDA GPU; nothing to check" >&2
  exit 1; }
export AUTOFIT_HOME="$OUT/home" PYTHONUNBUFFERED=1

echo "== 1. cuda-marked tests"
$PY -m pytest -q -m cuda tests 2>&1 | tee "$OUT/cuda-tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== 2. probe + train: GPT-2 124M, seed batch shape, emulating rtx4070-12gb"
CFG=(--preset gpt2-124m --set dataset=embedded --set batch_size=16 --set gradient_accumulation_steps=32
     --set block_size=1024 --set dtype=bfloat16 --set compile=True --set compile_after=30
     --set max_iters=60 --set lr_decay_iters=60 --set warmup_iters=10 --set eval_interval=0
     --set log_interval=1 --checkpointing 0 --compile --out "$OUT/run")
AUTOFIT_FAULT_OOM_AT_STEP=40 timeout 480 $AUTOFIT run --profile rtx4070-12gb --emulate \
  --no-progress "${CFG[@]}" 2>&1 | tee "$OUT/run.log"
run_rc=${PIPESTATUS[0]}

echo "== 3. summary"
$PY scripts/selfcheck_report.py "$OUT" "$tests_rc" "$run_rc"
