#!/usr/bin/env bash
# Set up (idempotent) and run the default test suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MOME_CACHE=${MOME_CACHE:-$HOME/.cache/mome}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # idle OpenMP threads sleep (see benchmarks/RESULTS.md)
exec "${MOME_VENV:-.venv}/bin/python" -m pytest "$@"
