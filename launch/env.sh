# Sourced by launch/*.sh: picks the Python interpreter and installs what the project needs.
#   DSV3_PYTHON=/path/to/python   use that interpreter (e.g. one with your own CUDA torch)
#   an active virtualenv           use it
#   otherwise                      create ./.venv
# If torch is missing, the CPU build torch==2.13.0 is installed first (so no CUDA wheels are pulled),
# then `pip install -e .[dev]` whenever pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${DSV3_PYTHON:-}" ]; then
  PY="$DSV3_PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    python3 -m venv .venv
  fi
  PY="$ROOT/.venv/bin/python"
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build)" >&2
  "$PY" -m pip install -q torch==2.13.0
fi
STAMP="$("$PY" -c 'import sys; print(sys.prefix)')/.dsv3-install-stamp"
WANT="$ROOT:$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] pip install -e .[dev]" >&2
  "$PY" -m pip install -q -e ".[dev]"
  echo "$WANT" > "$STAMP"
fi
export PYTHONUNBUFFERED=1
