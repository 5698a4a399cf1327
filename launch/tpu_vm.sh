#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice, from this checkout.
#
#   launch/tpu_vm.sh TPU_NAME ZONE 'python -m train --config=configs/lm.py:llama_1b --workdir=/mnt/shared/run'
#
# JAX on a TPU VM finds its peers from the TPU metadata, so the command needs no
# multi-host flags. The workdir must be a directory every worker sees.
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: $0 TPU_NAME ZONE 'COMMAND'" >&2
  exit 2
fi
name=$1 zone=$2 command=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
tpu=(gcloud compute tpus tpu-vm)

# Ship the checkout (tracked files only) and install it on every worker.
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
"${tpu[@]}" scp "$archive" "$name":kiln.tar.gz --zone="$zone" --worker=all
"${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="
  set -e
  rm -rf ~/kiln && mkdir ~/kiln && tar -xzf ~/kiln.tar.gz -C ~/kiln
  cd ~/kiln && pip install -q -e . 'jax[tpu]'
"
# The same command on every worker, at once; output comes back prefixed by worker.
"${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="cd ~/kiln && $command"
