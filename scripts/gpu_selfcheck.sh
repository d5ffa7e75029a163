#!/usr/bin/env bash
# GPU self-check in stages, each under its own time limit, each writing its JSON into OUT as it
# goes (so a time-out still leaves what was measured); about 6 minutes on an H100/H200.
#
#   bash scripts/gpu_selfcheck.sh OUT             on a machine with an NVIDIA GPU
#   bash scripts/gpu_selfcheck.sh --dry-run OUT   anywhere: CUDA stages skipped with a reason,
#                                                 the rest run for real on the CPU; exits 0
#
#   stage 0  environment: every dependency importable at a version pyproject accepts
#   stage 1  (<= 2 min) card identity, NVML vs torch; context + cuBLAS/SDPA workspace bytes;
#            pytest -m cuda
#   stage 2  (<= 4 min) probe of GPT-2 124M at the seed config's batch shape, emulating an
#            rtx4070-12gb: each trial's estimated vs measured peak and return to baseline
#   stage 3  training with compile switched on after 3 eager steps, an injected OOM recovered,
#            tokens/s and MFU against this card's own peak
#   stage 4  (<= 150 s) 2 ranks (torchrun, NCCL) where there are several GPUs, skipped with the
#            reason on one: one agreed plan, an OOM on rank 1 only recovered by both
#   then     scripts/selfcheck_report.py: OUT/report.md, the rows for docs/gpu-selfcheck.md
#
# Offline machines (the device tool's): wheels for what the machine lacks are prepared here by
# scripts/prepare_device_wheels.sh into .whl/; this script installs them with
# `pip --no-index --no-deps --target` and runs autofit from the working tree (PYTHONPATH), with
# the machine's own torch. OUT gets at most 7 files; run directories, checkpoints and profiles go
# to a scratch directory (SELFCHECK_WORK, default a fresh temp dir).
#
# Environment: SELFCHECK_PYTHON (default python3), SELFCHECK_STAGES (default "0 1 2 3 4"),
# SELFCHECK_LIMIT_0..4 (seconds), SELFCHECK_WORK, SELFCHECK_SITE (default /tmp/autofit-site),
# SELFCHECK_WHEELS=1 (a dry run installs .whl/ too: to rehearse the offline install on a CPU
# machine, with wheels prepared for its Python by DEVICE_PYTHON=3.x prepare_device_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_selfcheck.sh [--dry-run] OUT" >&2; exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
rm -f "$OUT"/stage[0-9]_*.json "$OUT/report.md" "$OUT/selfcheck.log"  # a rerun starts clean
PY=${SELFCHECK_PYTHON:-python3}
STAGES=${SELFCHECK_STAGES:-0 1 2 3 4}
# worst case 30 + 110 + 180 + 240 = 560 s, inside the device tool's 600 s a command; stage 4 takes
# seconds on one GPU (a skip) and up to 150 s more where there are several
LIMITS=("${SELFCHECK_LIMIT_0:-30}" "${SELFCHECK_LIMIT_1:-110}" "${SELFCHECK_LIMIT_2:-180}" "${SELFCHECK_LIMIT_3:-240}"
        "${SELFCHECK_LIMIT_4:-150}")
KEEP_WORK=${SELFCHECK_WORK:+1}
WORK=${SELFCHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/selfcheck.XXXXXX")}
mkdir -p "$WORK"
[ -z "$KEEP_WORK" ] && trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 AUTOFIT_HOME="$WORK/home"  # a fresh profile store: no saved plan is reused
DRYFLAG=(); [ $DRY = 1 ] && DRYFLAG=(--dry-run)

setup() {
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  local wheels=("$REPO"/.whl/*.whl)
  if [ $DRY = 1 ] && [ "${SELFCHECK_WHEELS:-0}" != 1 ]; then
    echo "dry run: wheels in .whl/ not installed (built for the device's Python; SELFCHECK_WHEELS=1 installs them)"
  elif [ -e "${wheels[0]}" ]; then
    export SELFCHECK_SITE=${SELFCHECK_SITE:-/tmp/autofit-site}
    echo "installing ${#wheels[@]} wheels from .whl/ into $SELFCHECK_SITE (offline: --no-index --no-deps)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SELFCHECK_SITE" "${wheels[@]}" \
      || { echo "gpu_selfcheck: installing the wheels in .whl/ failed" >&2; return 1; }
    export PYTHONPATH="$SELFCHECK_SITE:$PYTHONPATH"
  fi
  if [ $DRY = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu_selfcheck: $PY's torch sees no CUDA GPU; on a machine without one run: bash scripts/gpu_selfcheck.sh --dry-run OUT" >&2
    return 1
  fi
}

# run_stage N NAME SCRIPT ARGS...: the stage under `timeout` (which stops its whole process group,
# autofit's own processes included); a stage cut short is marked timed_out in its JSON.
run_stage() {
  local n=$1 name=$2 script=$3; shift 3
  local limit=${LIMITS[$n]}
  echo "== stage $n: $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$PY" "scripts/selfcheck/$script" "$OUT" "$@" --limit "$limit" "${DRYFLAG[@]}"
  local rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    echo "stage $n: stopped after its ${limit} s limit"
    "$PY" scripts/selfcheck/common.py timed-out "$OUT/stage${n}_${name}.json" "$limit"
  fi
}

main() {
  echo "gpu_selfcheck $([ $DRY = 1 ] && echo '(dry run) ')on ${HOSTNAME:-?}, $(date -u +%Y-%m-%dT%H:%M:%SZ); stages: $STAGES"
  setup || return 1
  for n in $STAGES; do
    case $n in
      0) run_stage 0 env env_check.py ;;
      1) run_stage 1 device stage1_device.py ;;
      2) run_stage 2 probe stage2_probe.py "$WORK" ;;
      3) run_stage 3 train stage3_train.py "$WORK" ;;
      4) run_stage 4 ranks stage4_ranks.py "$WORK" ;;
      *) echo "gpu_selfcheck: unknown stage $n (0-4)" >&2; return 2 ;;
    esac
  done
  echo "== report"
  "$PY" scripts/selfcheck_report.py "$OUT" --stages "$STAGES"
}

main 2>&1 | tee -a "$OUT/selfcheck.log"
exit "${PIPESTATUS[0]}"
