#!/usr/bin/env bash
# One training process per GPU (or CPU process with gloo) on this node, through torchrun.
#   ./distributed_train.sh NUM_PROC /path/to/imagenet [main.py arguments]
# Across nodes, call torchrun yourself (see README): torchrun --nnodes ... main.py ...
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 NUM_PROC [main.py arguments]" >&2
  exit 2
fi
NUM_PROC=$1
shift
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node="$NUM_PROC" \
  "$(dirname "$0")/main.py" "$@"
