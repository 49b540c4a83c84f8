#!/usr/bin/env bash
# Runs the test suite on a fresh machine: installs atlas_jax with its test extras (CPU torch
# for parity checks, libtpu for AOT compiles) into ./.venv once, then runs pytest on the CPU.
# Usage: bash launch/test.sh [pytest args]      fast tier: bash launch/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
ensure_venv test
export JAX_PLATFORMS=cpu
set +e
# Test files run in parallel, one file per worker at a time (module fixtures stay shared);
# ATLAS_TEST_WORKERS=0 runs everything in this process.
"$VENV/bin/python" -m pytest -n "${ATLAS_TEST_WORKERS:-auto}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "launch/test.sh: pytest collected no tests; failing on purpose" >&2
  exit 1
fi
exit "$rc"
