#!/usr/bin/env bash
# Downloads, on this machine (which reaches the package registry), the wheels that the offline GPU
# machine lacks for autofit, into .whl/ (git-ignored), so that scripts/gpu_selfcheck.sh can
# install them there with pip --no-index. Run it before a device session:
#
#   bash scripts/setup_env.sh && bash scripts/prepare_device_wheels.sh
#
# What to fetch is worked out by scripts/selfcheck/device_wheels.py: pyproject's dependencies
# (core and dev) missing from scripts/selfcheck/device_packages.txt, with their own needs, each at
# the version installed in .venv. Wheels are for the device's CPython (DEVICE_PYTHON, default
# 3.12) on manylinux x86-64, fetched with --no-deps (every one is named), one version of each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
if [ ! -x "$PY" ]; then
  echo "prepare_device_wheels: $PY not found; run bash scripts/setup_env.sh first" >&2; exit 1
fi
specs=$("$PY" scripts/selfcheck/device_wheels.py --python-version "$DEVICE_PYTHON")
if [ -z "$specs" ]; then
  echo "prepare_device_wheels: the device has every dependency; nothing to fetch"; rm -rf .whl; exit 0
fi
# pip matches manylinux tags exactly: name every one a wheel may carry up to the device's glibc
# (Ubuntu 24.04: 2.39)
platforms=()
for p in manylinux1 manylinux2010 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
         manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux_2_39; do
  platforms+=(--platform "${p}_x86_64")
done
tmp=$(mktemp -d "${TMPDIR:-/tmp}/whl.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086 # one NAME==VERSION per word
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
  "${platforms[@]}" -d "$tmp" $specs
n_specs=$(echo "$specs" | wc -l)
n_wheels=$(ls "$tmp"/*.whl | wc -l)
if [ "$n_wheels" != "$n_specs" ]; then
  echo "prepare_device_wheels: expected $n_specs wheels, got $n_wheels in $tmp" >&2; exit 1
fi
{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "prepared $(date -u +%Y-%m-%dT%H:%M:%SZ) for CPython $DEVICE_PYTHON manylinux x86_64"
  echo "$specs"
} > "$tmp/MANIFEST.txt"
rm -rf .whl && mv "$tmp" .whl && chmod 755 .whl   # replaced whole: never two versions of one package
trap - EXIT
echo "prepare_device_wheels: $n_wheels wheels in .whl/ ($(du -sh .whl | cut -f1)); carry it to the device:"
echo "$specs" | sed 's/^/  /'
