#!/usr/bin/env bash
# Refresh requirements/lock-cpu.txt: install the newest releases inside pyproject.toml's ranges into a scratch venv
# (CPU torch pin), run the default test suite there, and write the lock only if the suite passes.
#   bash scripts/lock.sh            # then review `git diff requirements/` and commit
#   MOME_LOCK_SKIP_TESTS=1 bash scripts/lock.sh   # freeze without testing (not recommended)
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=${MOME_LOCK_VENV:-$(mktemp -d)/venv}
MOME_VENV="$SCRATCH" MOME_UNPINNED=1 bash scripts/setup.sh
if [ "${MOME_LOCK_SKIP_TESTS:-0}" != 1 ]; then
  MOME_CACHE=${MOME_CACHE:-$HOME/.cache/mome} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled \
    OMP_WAIT_POLICY=PASSIVE "$SCRATCH/bin/python" -m pytest -q
fi
{
  echo "# The package set the MoME test suite last passed on (CPU install, Python $("$SCRATCH/bin/python" -c 'import sys; print(*sys.version_info[:2], sep=".")')), as pip constraints."
  echo "# Installed by scripts/setup.sh; refreshed by scripts/lock.sh. torch and CUDA companions are skipped on a machine"
  echo "# that already has a torch (GPU machines install their CUDA build first)."
  "$SCRATCH/bin/python" -m pip freeze --exclude-editable | sed 's/+cpu$//' | LC_ALL=C sort -f
} > requirements/lock-cpu.txt
echo "[lock] wrote requirements/lock-cpu.txt from $SCRATCH"
