#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: every host of the slice runs the same command, and
# parallel.initialize() starts jax.distributed from the TPU metadata (no addresses to pass).
#
#   experiments/launch/tpu_vm.sh create             # allocate the slice
#   experiments/launch/tpu_vm.sh setup              # copy this checkout to every host, install
#   experiments/launch/tpu_vm.sh run [ARGS...]      # python -m train on every host (--worker=all)
#   experiments/launch/tpu_vm.sh delete             # release the slice (billing stops)
#
# Override any variable below from the environment, e.g. TPU_NAME=mine ZONE=us-central2-b ...
set -euo pipefail

TPU_NAME="${TPU_NAME:-jaxlm-$USER}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"            # v4-32: 4 hosts x 4 chips
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-experiments/gpt2_124m.py}"
WORKDIR="${WORKDIR:-gs://YOUR_BUCKET/jaxlm/$TPU_NAME}"    # shared by all hosts: use GCS
REMOTE_DIR="${REMOTE_DIR:-jaxlm}"                          # in each host's home directory

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TPU=(gcloud compute tpus tpu-vm --zone="$ZONE" --project="$PROJECT")

on_all_workers() {
  "${TPU[@]}" ssh "$TPU_NAME" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    "${TPU[@]}" create "$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
    ;;
  setup)
    # The working tree as it is here (uncommitted edits too), without venvs and run outputs.
    archive="$(mktemp -d)/jaxlm.tar.gz"
    tar -C "$REPO_ROOT" --exclude=.venv --exclude=runs --exclude=.git -czf "$archive" .
    "${TPU[@]}" scp "$archive" "$TPU_NAME:jaxlm.tar.gz" --worker=all
    on_all_workers "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf jaxlm.tar.gz \
      && cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
      && .venv/bin/pip install -q -e . 'jax[tpu]'"
    ;;
  run)
    shift
    # Every host runs the same program; jax numbers them and the mesh spans all chips.
    on_all_workers "cd $REMOTE_DIR && .venv/bin/python -m train --config $CONFIG \
      --workdir $WORKDIR $*"
    ;;
  delete)
    "${TPU[@]}" delete "$TPU_NAME" --quiet
    ;;
  *)
    echo "usage: $0 create|setup|run [ARGS...]|delete" >&2
    exit 2
    ;;
esac
