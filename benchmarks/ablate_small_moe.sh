#!/usr/bin/env bash
# The default load-balancing matrix on configs/small_moe.yaml: 6 variants (no balancing, sequence-wise
# and batch-wise auxiliary loss, aux-loss-free sign update with and without the sequence-wise loss,
# proportional update) x 3 seeds, the same data order per seed. Writes runs/ablate_small_moe/report.md
# and its plots. Resumable: rerunning skips finished runs. Not run in CI.
#   bash benchmarks/ablate_small_moe.sh                 # STEPS=400 (the config's own schedule): ~75-90 min on 2 CPU cores
#   STEPS=400 SEEDS=3 OUT=runs/abl bash benchmarks/ablate_small_moe.sh train.micro_batch_size=8
source "$(dirname "${BASH_SOURCE[0]}")/../launch/env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$PY" -m dsv3.tools.ablate --config configs/small_moe.yaml --steps "${STEPS:-400}" --seeds "${SEEDS:-3}" \
  --out "${OUT:-runs/ablate_small_moe}" --baseline aux_seq "$@"
