#!/usr/bin/env bash
# Train configs/debug.yaml (or the YAML given first) on the embedded corpus; extra arguments are
# config overrides:  bash launch/train.sh train.steps=50 model.moe.n_routed_experts=16
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
CONFIG=configs/debug.yaml
if [ $# -gt 0 ] && [[ "$1" == *.yaml || "$1" == *.yml ]]; then CONFIG="$1"; shift; fi
exec "$PY" -m dsv3.train "$CONFIG" "$@"
