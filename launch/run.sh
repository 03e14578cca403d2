#!/usr/bin/env bash
# Single-node torchrun:  bash launch/run.sh --nproc 4 configs/debug.yaml train.micro_batch_size=4 [key.path=value ...]
# (train.global_batch must split into nproc/pp × micro_batch_size: dsv3/data/batch.py)
# gloo on CPU (the default when no GPU is visible), NCCL on GPUs. Each CPU rank uses one thread
# unless OMP_NUM_THREADS is set. A bad --nproc is one line and exit 2, before any set-up runs.
NPROC=1
if [ "${1:-}" = "--nproc" ] || [[ "${1:-}" == --nproc=* ]]; then
  if [ "$1" = "--nproc" ]; then
    if [ $# -lt 2 ]; then echo "error: --nproc needs a value: the number of processes, e.g. --nproc 4" >&2; exit 2; fi
    NPROC="$2"; shift 2
  else
    NPROC="${1#--nproc=}"; shift
  fi
  if ! [[ "$NPROC" =~ ^[0-9]{1,4}$ ]] || [ "$((10#$NPROC))" -lt 1 ]; then
    echo "error: --nproc '$NPROC': expected a positive integer (processes on this node), e.g. --nproc 4" >&2; exit 2
  fi
fi
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
CONFIG=configs/debug.yaml
if [ $# -gt 0 ] && [[ "$1" == *.yaml || "$1" == *.yml ]]; then CONFIG="$1"; shift; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m dsv3.train "$CONFIG" "$@"
