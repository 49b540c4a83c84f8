#!/usr/bin/env bash
# The GPU device check (launch/device_check.py says what each stage does). From the
# repository root:
#
#   bash launch/device_check.sh --fetch-wheels   # here, with PyPI: fill .device_wheels/
#   bash launch/device_check.sh                  # on the GPU host: every stage, < 8 minutes
#   bash launch/device_check.sh --dry_run        # here: every stage at tiny sizes on CPU
#
# Other arguments pass through to launch/device_check.py (--stages, --budget_s, --workdir).
# The interpreter is $PYTHON, else ./.venv's (or $ATLAS_VENV's), else python3.
#
# --fetch-wheels downloads, for the GPU host's CPython 3.12 on x86-64 Linux, the packages
# of the base install that such a host lacks (it has jax, flax, optax, orbax-checkpoint,
# transformers, torch, numpy, pillow, safetensors and jinja2, not grain,
# tensorflow-datasets, ml_collections or tensorboardX), at the versions ./.venv holds, into
# .device_wheels/ (git-ignored; under 60 MiB). The check's install stage puts the ones the
# host lacks into <workdir>/site. JAX itself is the host's: the project's pin with its CUDA
# plugin is about 210 MiB of wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="${ATLAS_DEVICE_WHEELS:-.device_wheels}"
CARRY=(grain array-record dm-tree tensorflow-datasets tensorflow-metadata
       googleapis-common-protos immutabledict promise simple-parsing docstring-parser termcolor
       toml portpicker ml-collections tensorboardX importlib-resources)
MAX_MIB=60

py="${PYTHON:-}"
if [ -z "$py" ]; then
  venv="${ATLAS_VENV:-.venv}"
  if [ -x "$venv/bin/python" ]; then py="$venv/bin/python"; else py=python3; fi
fi

fetch_wheels() {
  rm -rf "$WHEELS"
  mkdir -p "$WHEELS"
  local name spec
  for name in "${CARRY[@]}"; do
    spec=$("$py" -c 'import importlib.metadata as m, sys
try:
  print(f"{sys.argv[1]}=={m.version(sys.argv[1])}")
except m.PackageNotFoundError:
  print(sys.argv[1])' "$name")
    # A wheel for the host's Python and platform; a pure-Python sdist is built here.
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "$spec" 2>/dev/null \
      || "$py" -m pip wheel -q --no-deps -w "$WHEELS" "$spec" \
      || { echo "no wheel for $spec" >&2; return 1; }
  done
  local kib
  kib=$(du -sk "$WHEELS" | cut -f1)
  ls -1 "$WHEELS"
  echo "$(ls "$WHEELS"/*.whl | wc -l) wheels, $((kib / 1024)) MiB in $WHEELS"
  if [ "$kib" -gt $((MAX_MIB * 1024)) ]; then
    echo "$WHEELS holds $((kib / 1024)) MiB; it must stay under $MAX_MIB MiB" >&2
    return 1
  fi
}

if [ "${1:-}" = "--fetch-wheels" ]; then
  fetch_wheels
  exit
fi
exec "$py" -m launch.device_check --wheels="$WHEELS" "$@"
