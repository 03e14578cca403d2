#!/usr/bin/env bash
# Single-node torchrun:  bash launch/run.sh --nproc 4 configs/debug.yaml [key.path=value ...]
# gloo on CPU (the default when no GPU is visible), NCCL on GPUs. Each CPU rank uses one thread
# unless OMP_NUM_THREADS is set.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
NPROC=1
if [ "${1:-}" = "--nproc" ]; then NPROC="$2"; shift 2; fi
CONFIG=configs/debug.yaml
if [ $# -gt 0 ] && [[ "$1" == *.yaml || "$1" == *.yml ]]; then CONFIG="$1"; shift; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m dsv3.train "$CONFIG" "$@"
