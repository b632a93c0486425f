#!/usr/bin/env bash
# Create ./.venv with the pinned requirements unless it is already there and up to date.
# Usage: source scripts/setup_env.sh   (sets $PY to the environment's python)
# RVOS_PYTHON=python3: use that Python as it is (a CUDA build of torch and the requirements
# already installed, e.g. on a machine without internet) and create no environment.
set -euo pipefail
if [ -n "${RVOS_PYTHON:-}" ]; then
    PY="$RVOS_PYTHON"
    export PY
    return 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RVOS_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
STAMP="$VENV/.requirements.sha256"
# requirements-export.txt: export.py and deploy/ (onnx, onnxruntime), whose tests the suite runs
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-export.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[setup] creating $VENV with $(command -v "$PYTHON_BIN"), requirements.txt and requirements-export.txt" >&2
    "$PYTHON_BIN" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ROOT/requirements.txt" \
        -r "$ROOT/requirements-export.txt"
    echo "$WANT" > "$STAMP"
fi
PY="$VENV/bin/python"
export PY
