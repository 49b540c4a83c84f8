#!/usr/bin/env bash
# Runs one training command on every worker of a Cloud TPU pod slice (multi-host).
#
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a WORKDIR=/mnt/shared/run1 \
#     bash launch/tpu_pod.sh configs/rl.py:qwen2.5-vl-7b --config.mesh.tensor=2 ...
#
# Every worker runs the same command; jax.distributed.initialize() finds the coordinator,
# process count and process id from the TPU metadata (config.distributed.initialize=True,
# the other distributed fields left empty). Each process reads its own shard of the data
# and orbax writes checkpoints cooperatively, so WORKDIR must be a path every worker sees
# (a shared filesystem, e.g. Filestore, or a bucket mounted with gcsfuse at the same path on
# every worker; gs:// URLs are not read directly). The repository must already be at REPO on
# every worker with its .venv installed (bash launch/test.sh, or pip install -e .).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
REPO=${REPO:-'~/atlas_jax'}
CONFIG=${1:?usage: tpu_pod.sh CONFIG [--config.x=y ...]}
shift
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO && .venv/bin/python -m launch.train --config=$CONFIG --workdir=$WORKDIR \
    --config.distributed.initialize=True $ARGS"
