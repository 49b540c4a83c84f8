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
# libtpu (the test extra installs it) probes for a TPU at start and prints a screen of
# warnings when there is none: on a machine without TPU or NVIDIA devices, say CPU.
if [ -z "${JAX_PLATFORMS:-}" ] && ! compgen -G "/dev/accel*" >/dev/null \
    && ! compgen -G "/dev/vfio/[0-9]*" >/dev/null && ! command -v nvidia-smi >/dev/null; then
  export JAX_PLATFORMS=cpu
fi
exec "$VENV/bin/python" -m launch.train --config=configs/demo.py --workdir="$WORKDIR" "$@"
