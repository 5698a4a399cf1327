#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice, from this checkout.
#
#   launch/tpu_vm.sh [--dry_run] TPU_NAME ZONE 'python -m train --config=configs/lm.py:llama_1b --workdir=/mnt/shared/run'
#
# JAX on a TPU VM finds its peers from the TPU metadata, so the command needs no
# multi-host flags. The workdir must be a directory every worker sees. --dry_run prints
# the commands (git archive, then the gcloud calls), one a line and quoted for the shell,
# instead of running them.
set -euo pipefail
dry_run=0
if [ "${1:-}" = --dry_run ]; then
  dry_run=1
  shift
fi
if [ $# -ne 3 ]; then
  echo "usage: $0 [--dry_run] TPU_NAME ZONE 'COMMAND'" >&2
  exit 2
fi
name=$1 zone=$2 command=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
tpu=(gcloud compute tpus tpu-vm)

# Runs its arguments, or with --dry_run prints them: words that need no quoting as they are,
# the rest single-quoted (bash's ${var@Q}), so that the line can be pasted into a shell.
run() {
  if ((dry_run)); then
    local words=() word
    for word in "$@"; do
      if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then words+=("$word"); else words+=("${word@Q}"); fi
    done
    echo "${words[*]}"
  else
    "$@"
  fi
}

# Ship the checkout (tracked files only) and install it on every worker.
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$name":kiln.tar.gz --zone="$zone" --worker=all
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="set -e; rm -rf ~/kiln; \
mkdir ~/kiln; tar -xzf ~/kiln.tar.gz -C ~/kiln; cd ~/kiln; pip install -q -e . \"jax[tpu]\""
# The same command on every worker, at once; output comes back prefixed by worker.
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="cd ~/kiln && $command"
