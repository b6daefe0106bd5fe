#!/usr/bin/env bash
# The embedded default, end to end on one CPU with nothing downloaded:
#   prepare the two pretrained models -> synthesise the AV corpus -> train MoME -> evaluate -> analyse experts.
# Every step is idempotent: converted weights, the corpus and a finished run are reused on a second call.
# Extra key=value arguments are passed to training, evaluation and analysis (e.g. train.max_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MOME_CACHE=${MOME_CACHE:-$HOME/.cache/mome}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# idle OpenMP threads sleep instead of spinning: with a loader worker or another process on the same cores,
# spinning made a SmolLM2 prefill 12x slower (benchmarks/RESULTS.md)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
PY=${MOME_VENV:-.venv}/bin/python
CFG=${MOME_DEMO_CONFIG:-configs/demo.yaml}
RUN=${MOME_DEMO_RUN:-runs/demo}

$PY -m mome.pretrained prepare
$PY -m mome.data.synth --config "$CFG" "$@"
$PY train.py --config "$CFG" train.resume=auto "$@"
$PY evaluate.py --checkpoint "$RUN" --out "$RUN/eval" "$@"
$PY -m analysis.expert_activation --checkpoint "$RUN" --out "$RUN/analysis" "$@"
echo "[demo] done: training curve, WER tables and expert plots are in $RUN"
