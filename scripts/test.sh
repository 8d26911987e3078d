#!/usr/bin/env bash
# The whole check: set-up, lint (ruff), types (mypy --strict), stub drift, tests (pytest).
# `scripts/test.sh --quick` skips tests marked slow; other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
VENV=${CNNSERVE_VENV:-$PWD/.venv}
export PATH=$VENV/bin:$PATH
# Idle OpenMP threads that spin steal the other core from the server and client under test.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
marker=()
if [ "${1:-}" = "--quick" ]; then marker=(-m "not slow"); shift; fi
echo "== ruff"
ruff check .
echo "== mypy --strict"
mypy
echo "== pytest"
set +e
python -m pytest "${marker[@]}" "$@"
rc=$?
set -e
# pytest exits 5 when nothing was collected; that is a failure of the suite, not a pass.
exit $rc
