#!/usr/bin/env bash
# One-shot GPU check (issue 17 G): on one NVIDIA Hopper GPU, in at most 6 minutes, five parts each in
# its own subprocess with its own timeout, the report written section by section:
#   1. every Triton kernel against its torch reference on the GPU
#   2. benchmarks/bench_fp8_gemm.py at DeepSeek-V3's shapes (ours vs BF16 vs torch._scaled_mm, %DeepGEMM)
#   3. 20 steps of configs/small_moe.yaml in BF16 and FP8: tokens/s, MFU, FP8 losses vs the torch reference
#   4. the parallelize() path (ZeRO-1) on an NCCL process group of world size 1
#   5. host syncs per step and the attention kernel the profiler sees
# Usage:
#   bash launch/gpu_check.sh [--out REPORT.md] [--parts 1,3]   on the GPU machine
#   bash launch/gpu_check.sh --dry-run                          the same parts at tiny sizes on CPU (~1 min)
# Python: $DSV3_PYTHON, else ./.venv/bin/python, else python3 (needs torch and triton; nothing is installed).
# The repo need not be pip-installed: PYTHONPATH is set to its root. The report goes to --out, else
# $OUT/gpu_check_report.md when OUT is set, else ./gpu_check_report.md; its path is printed last.
# Exit status 0 when the check ran (pass/fail of each part is in the report), 2 on a bad argument.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${DSV3_PYTHON:-}" ]; then
  PY="$DSV3_PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python || true)"
fi
if [ -z "$PY" ] || ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" >/dev/null 2>&1; then
  echo "gpu_check: no Python with torch found (tried '${PY:-python3}'); set DSV3_PYTHON=/path/to/python" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/launch/gpu_check.py" "$@"
