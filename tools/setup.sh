#!/usr/bin/env bash
# Idempotent set-up of .venv at the repository root: CPU torch, the runtime and the test requirements,
# at the newest releases a fresh install takes.
#   --locked            the versions last tested together (tools/requirements-lock.txt)
#   --constraints FILE  any other pin set, e.g. tests/constraints-min.txt (the lowest transformers allowed)
# TORCH_SPEC overrides the torch pin (e.g. a CUDA build on a GPU machine); VENV the folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
pins=()
case "${1:-}" in
  "") ;;
  --locked) pins=(-c tools/requirements-lock.txt) ;;
  --constraints) pins=(-c "${2:?--constraints needs a file}") ;;
  *) echo "usage: bash tools/setup.sh [--locked | --constraints FILE]" >&2; exit 2 ;;
esac
venv="${VENV:-.venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" -r requirements.txt -r tests/requirements.txt
