#!/usr/bin/env bash
# Runs the test suite on a fresh machine: creates .venv, installs atlas_jax with its test
# extras (CPU torch for parity checks), then runs pytest on the CPU.
# Usage: bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
export JAX_PLATFORMS=cpu
set +e
.venv/bin/python -m pytest "${@:-tests}"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "launch/test.sh: pytest collected no tests; failing on purpose" >&2
  exit 1
fi
exit "$rc"
