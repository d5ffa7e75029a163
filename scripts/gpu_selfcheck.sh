#!/usr/bin/env bash
# GPU self-check in stages, each under its own time limit, each writing its JSON into OUT as it
# goes (so a time-out still leaves what was measured, the run's raw records included); at most
# 383 s, about 4 minutes on an H100/H200. The report is rewritten after every stage, so even a
# call killed from outside leaves one; no process of a stage outlives it (its process group is
# killed when it returns).
#
#   bash scripts/gpu_selfcheck.sh OUT             on a machine with an NVIDIA GPU
#   bash scripts/gpu_selfcheck.sh --dry-run OUT   anywhere: CUDA stages skipped with a reason,
#                                                 the rest run for real on the CPU; exits 0
#
#   stage 0  environment: every dependency importable at a version pyproject accepts
#   stage 1  (<= 55 s) card identity, NVML vs torch vs libcuda; context + cuBLAS/SDPA workspace
#            bytes; the SDPA backend torch picks (a fallback for stages 2-3 if it fails) and the
#            allocator's real settings; pytest -m cuda
#   stage 2  (<= 100 s) probe of GPT-2 124M (vocab 50304) at the seed config's batch shape,
#            emulating an rtx4070-12gb: each trial's estimated vs measured peak and return to baseline;
#            each trial's record reaches OUT/stage2_trials.jsonl as it ends (the probe appends it)
#   stage 3  (<= 120 s) GPT-2 124M (vocab 50304) training: an injected OOM recovered while eager,
#            compile switched on after 4 steps (one cold compile), tokens/s and MFU against this
#            card's own peak
#   stage 4  (<= 20 s) 2 ranks (torchrun, NCCL) where there are several GPUs (give it
#            SELFCHECK_LIMIT_4=150 there), skipped with the reason on one
#   then     scripts/selfcheck_report.py: OUT/report.md, the rows for docs/gpu-selfcheck.md
#
# Offline machines (the device tool's): wheels for what the machine lacks are prepared here by
# scripts/prepare_device_wheels.sh into .whl/; this script installs them with
# `pip --no-index --no-deps --target` and runs autofit from the working tree (PYTHONPATH), with
# the machine's own torch. OUT gets 8 files at most (the device tool's limit): the report, the log,
# a JSON per stage and stage 2's trial records (stage2_trials.jsonl); run directories, checkpoints and profiles go
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
rm -f "$OUT"/stage[0-9]_*.json "$OUT"/stage[0-9]_*.jsonl "$OUT/report.md" "$OUT/selfcheck.log"  # a rerun starts clean
PY=${SELFCHECK_PYTHON:-python3}
STAGES=${SELFCHECK_STAGES:-0 1 2 3 4}
# The limits and their worst case against the device tool's 600 s call and 15-minute lease:
# scripts/selfcheck/common.py timing_plan (printed below; a run whose limits break it stops).
LIMITS=("${SELFCHECK_LIMIT_0:-15}" "${SELFCHECK_LIMIT_1:-55}" "${SELFCHECK_LIMIT_2:-100}" "${SELFCHECK_LIMIT_3:-120}"
        "${SELFCHECK_LIMIT_4:-20}")
SETUP_LIMIT=20  # each of the two setup commands; common.SETUP_S counts both
KILL_GRACE=3  # common.KILL_GRACE_S
REPORT_LIMIT=3  # common.REPORT_S
GPU_LIMITS=("${LIMITS[@]}")  # what the timing plan is checked on
# The dry run's stage 4 runs 2 gloo ranks on the CPU (a skip on one GPU takes seconds): more time
[ $DRY = 1 ] && LIMITS[4]=${SELFCHECK_LIMIT_4:-120}
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
    timeout "$SETUP_LIMIT" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SELFCHECK_SITE" "${wheels[@]}" \
      || { echo "gpu_selfcheck: installing the wheels in .whl/ failed" >&2; return 1; }
    export PYTHONPATH="$SELFCHECK_SITE:$PYTHONPATH"
  fi
  if [ $DRY = 0 ] && ! timeout "$SETUP_LIMIT" "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu_selfcheck: $PY's torch sees no CUDA GPU; on a machine without one run: bash scripts/gpu_selfcheck.sh --dry-run OUT" >&2
    return 1
  fi
}

# run_stage N NAME SCRIPT ARGS...: the stage under `timeout`, which puts it in a process group of
# its own and signals the whole group at the limit (SIGTERM, SIGKILL KILL_GRACE s later); once it
# returns, whatever is left of that group (an autofit run finishing its checkpoint) is killed, so
# nothing of a stage runs on into the next. A stage cut short is marked timed_out in its JSON; the
# report is written again after every stage.
run_stage() {
  local n=$1 name=$2 script=$3; shift 3
  local limit=${LIMITS[$n]}
  echo "== stage $n: $name (limit ${limit} s)"
  timeout --kill-after="$KILL_GRACE" "$limit" "$PY" "scripts/selfcheck/$script" "$OUT" "$@" --limit "$limit" \
    "${DRYFLAG[@]}" &
  local pid=$!
  wait "$pid"
  local rc=$?
  kill -KILL -- "-$pid" 2>/dev/null  # timeout's process group (its pid): the stage's leftovers
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    echo "stage $n: stopped after its ${limit} s limit"
    "$PY" scripts/selfcheck/common.py timed-out "$OUT/stage${n}_${name}.json" "$limit"
  fi
  if [ "$n" = 1 ]; then  # the SDPA fallback stage 1 found necessary, for stages 2-3
    local env_lines; env_lines=$("$PY" scripts/selfcheck/common.py stage-env "$OUT/stage1_device.json")
    [ -n "$env_lines" ] && { echo "from stage 1: $env_lines"; eval "$env_lines"; }
  fi
  timeout "$REPORT_LIMIT" "$PY" scripts/selfcheck_report.py "$OUT" --no-roofline --stages "$STAGES" --quiet
}

main() {
  echo "gpu_selfcheck $([ $DRY = 1 ] && echo '(dry run) ')on ${HOSTNAME:-?}, $(date -u +%Y-%m-%dT%H:%M:%SZ); stages: $STAGES"
  "$PY" scripts/selfcheck/common.py timing-plan "${GPU_LIMITS[@]}" \
    || { echo "gpu_selfcheck: these stage limits do not fit the device call and lease (above)" >&2; return 2; }
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
  timeout "$REPORT_LIMIT" "$PY" scripts/selfcheck_report.py "$OUT" --no-roofline --stages "$STAGES"
}

main 2>&1 | tee -a "$OUT/selfcheck.log"
exit "${PIPESTATUS[0]}"
