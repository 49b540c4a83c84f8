#!/usr/bin/env bash
# The main job on a fresh machine: installs atlas_jax into ./.venv (base install, once),
# then runs the demo: synthetic suite, SFT, LA-GRPO, held-out evaluations, summary table.
# Exits non-zero if SFT did not learn (held-out accuracy below configs/demo.py's bar).
# Usage: bash launch/demo.sh [--config.x=y ...]     workdir: $ATLAS_WORKDIR (/tmp/atlas_demo)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
ensure_venv ""
WORKDIR=${ATLAS_WORKDIR:-/tmp/atlas_demo}
exec "$VENV/bin/python" -m launch.train --config=configs/demo.py --workdir="$WORKDIR" "$@"
