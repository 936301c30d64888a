#!/usr/bin/env bash
# Idempotent set-up of .venv at the repository root: CPU torch, the runtime requirements and the
# test requirements. TORCH_SPEC overrides the torch pin (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r tests/requirements.txt
