#!/usr/bin/env bash
# Set up the environment, then run the test suite (CPU only; kernels under TRITON_INTERPRET=1).
# Extra arguments go to pytest:  bash launch/test.sh tests/test_moe.py -k router
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m pytest tests "$@"
