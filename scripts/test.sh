#!/usr/bin/env bash
# Run the whole test suite, creating ./.venv first if needed. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$PY" -m pytest -q -rs tests "$@"
