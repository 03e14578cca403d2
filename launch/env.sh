# Sourced by launch/*.sh: picks the Python interpreter and installs what the project needs.
#   DSV3_PYTHON=/path/to/python   use that interpreter (e.g. one with your own CUDA torch)
#   an active virtualenv           use it
#   otherwise                      create ./.venv
#   DSV3_NO_INSTALL=1              install nothing (a cluster image that already has everything)
# If torch is missing on a machine without NVIDIA GPUs, the CPU build torch==2.13.0 is installed first;
# on a GPU machine that is refused (one line, exit 2): bring a CUDA build, a CPU torch would quietly train
# on gloo. `pip install -e .[dev]` runs whenever pyproject.toml changed since the last install, with the
# installed torch pinned, so pip never replaces the torch you brought.
# Exports TORCH_VERSION, TORCH_CUDA (the CUDA version torch was built with, empty for a CPU build) and
# TORCH_GPUS (GPUs torch sees) for the launchers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${DSV3_PYTHON:-}" ]; then
  PY="$DSV3_PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  if [ ! -x .venv/bin/python ]; then
    if [ "${DSV3_NO_INSTALL:-0}" = 1 ]; then
      echo "error: DSV3_NO_INSTALL=1 but no interpreter is given: set DSV3_PYTHON or activate a virtualenv" >&2
      exit 2
    fi
    echo "[setup] creating .venv" >&2
    python3 -m venv .venv
  fi
  PY="$ROOT/.venv/bin/python"
fi

dsv3_has_gpus() {  # NVIDIA GPUs on this machine or in this Slurm allocation
  [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" != 0 ] && return 0
  [ -e /dev/nvidia0 ] && return 0
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

TORCH_INFO="$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda or '-', torch.cuda.device_count())" \
              2>/dev/null || true)"
if [ -z "$TORCH_INFO" ]; then
  if [ "${DSV3_NO_INSTALL:-0}" = 1 ]; then
    echo "error: $PY cannot import torch and DSV3_NO_INSTALL=1: install torch into it or set DSV3_PYTHON" >&2
    exit 2
  fi
  if dsv3_has_gpus; then
    echo "error: $PY cannot import torch and this machine has NVIDIA GPUs: install a CUDA build of torch" \
         "(pytorch.org/get-started) or set DSV3_PYTHON to an interpreter with one; not installing the CPU build" >&2
    exit 2
  fi
  echo "[setup] installing torch==2.13.0 (CPU build)" >&2
  "$PY" -m pip install -q torch==2.13.0
  TORCH_INFO="$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda or '-', torch.cuda.device_count())")"
fi
read -r TORCH_VERSION TORCH_CUDA TORCH_GPUS <<< "$TORCH_INFO"
[ "$TORCH_CUDA" = "-" ] && TORCH_CUDA=""
export TORCH_VERSION TORCH_CUDA TORCH_GPUS

if [ "${DSV3_NO_INSTALL:-0}" != 1 ]; then
  STAMP="$("$PY" -c 'import sys; print(sys.prefix)')/.dsv3-install-stamp"
  WANT="$ROOT:$(sha256sum pyproject.toml | cut -c1-16)"
  if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    echo "[setup] pip install -e .[dev] (torch==$TORCH_VERSION kept)" >&2
    PIN="$(mktemp)"
    echo "torch==$TORCH_VERSION" > "$PIN"
    "$PY" -m pip install -q -e ".[dev]" -c "$PIN"
    rm -f "$PIN"
    echo "$WANT" > "$STAMP"
  fi
fi
export PYTHONUNBUFFERED=1
