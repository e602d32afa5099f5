#!/usr/bin/env bash
# One training process per GPU (or CPU process with gloo) on this node, through torchrun.
#   ./distributed_train.sh NUM_PROC /path/to/imagenet [main.py arguments]
#   ./distributed_train.sh NUM_PROC --script train_seg.py /path/to/ADEChallengeData2016 [train_seg.py arguments]
#   ./distributed_train.sh NUM_PROC --script train_det.py /path/to/coco [train_det.py arguments]
# Across nodes, call torchrun yourself (see docs/training.md): torchrun --nnodes ... main.py ...
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 NUM_PROC [--script main.py|train_seg.py|train_det.py] [script arguments]" >&2
  exit 2
fi
NUM_PROC=$1
shift
SCRIPT=main.py
if [ "${1:-}" = "--script" ]; then
  if [ $# -lt 2 ]; then
    echo "$0: --script needs a file name (main.py, train_seg.py or train_det.py)" >&2
    exit 2
  fi
  SCRIPT=$2
  shift 2
fi
case "$SCRIPT" in
  /*) ;;
  *) SCRIPT="$(dirname "$0")/$SCRIPT" ;;
esac
if [ ! -f "$SCRIPT" ]; then
  echo "$0: --script $SCRIPT: no such file" >&2
  exit 2
fi
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node="$NUM_PROC" "$SCRIPT" "$@"
