#!/usr/bin/env bash
# The main job on the embedded default, offline: see docs/main-job.md. Extra args go to demo.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$PY" demo.py "$@"
