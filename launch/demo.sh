#!/usr/bin/env bash
# The main job on a fresh machine: creates .venv, installs atlas_jax, runs the demo.
# Usage: bash launch/demo.sh [demo args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
WORKDIR=${ATLAS_WORKDIR:-/tmp/atlas_demo}
exec .venv/bin/python -m launch.train --config=configs/demo.py --workdir="$WORKDIR" "$@"
