"""How long a comparison should take on 2 CPU cores, before it runs (``compare --plan``; the page shows it too).

A cost model with a few measured constants, each with its source, applied to every run's resolved config:

* a training step costs ``STEP_BASE_S + STEP_PER_PAIR_S`` x (its AVSR pairs + ``ASR_WEIGHT`` x its ASR scales),
  where a ``model.matryoshka=sample`` step trains one scale (the mean of its scales' costs): 3.6 s for the 4
  Matryoshka pairs of ``matryoshka=all`` (benchmarks/RESULTS.md, "Training-step cost of the demo config": 3.1-3.9 s
  a step with bf16 backbones and eager attention, ~4.5 utterances; 3.5-4 s in the 300-step demo runs, bf16 EPYC),
  1.35 s for one pair (the demo recipe's ``sample`` steps, same CPU: 1.2-1.6 s, fewer tokens cheaper; the 260-step
  runs of results/compare_demo took 333-462 s each, 70.8 min for 11 runs);
* a run takes ``min(max_steps x step, max_minutes)`` plus ``RUN_OVERHEAD_S`` (model build, GEMM probe,
  checkpoints) plus its final validation (teacher-forced loss over ``train.val_utterances`` and greedy decoding of
  ``train.val_wer_samples`` utterances, per scale);
* greedy decoding costs ``DECODE_S`` per utterance and scale, beam search ``BEAM_FACTOR`` x beams times that, plus
  ``EVAL_LOAD_S`` per evaluation call (results/compare_demo, bf16 EPYC: 0.23 s in batches of 20, 0.19 s in
  batches of 40; 3 beams 0.5 s);
* the judge ``JUDGE_S`` per utterance and SNR (same page: 160 decodes in 74 s); a routing trace ``TRACE_S`` per
  utterance and scale (4 traces in 36 s there).

The tiny ``--quick`` models are far cheaper than the model here predicts: the estimate is for the real backbones.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

STEP_BASE_S = 0.6
STEP_PER_PAIR_S = 0.75
ASR_WEIGHT = 0.0  # an ASR step (no video tokens, no video front end) costs about the fixed part: 0.7 s measured
RUN_OVERHEAD_S = 30.0
VAL_LOSS_S = 0.25  # per utterance and scale, teacher-forced
DECODE_S = 0.2  # per utterance and scale, greedy, batches of 40
BEAM_FACTOR = 0.75  # beam search with b beams costs ~0.75 b x greedy (batched beams)
EVAL_LOAD_S = 10.0
JUDGE_S = 0.4
TRACE_S = 0.06
ANALYSIS_LOAD_S = 5.0


def step_seconds(scales: Sequence[str], matryoshka: str = "all") -> float:
    pairs = sum(1 for s in scales if s.startswith("avsr:"))
    asr = sum(1 for s in scales if not s.startswith("avsr:"))
    work = pairs + ASR_WEIGHT * asr
    if matryoshka == "sample":  # one scale drawn per step
        work /= max(1, len(scales))
    return STEP_BASE_S + STEP_PER_PAIR_S * work


def train_seconds(scales: Sequence[str], max_steps: int, max_minutes: float, val_utterances: int,
                  val_wer_samples: int, matryoshka: str = "all") -> float:
    steps = step_seconds(scales, matryoshka) * max_steps
    if max_minutes > 0:
        steps = min(steps, 60.0 * max_minutes)
    val = len(scales) * (VAL_LOSS_S * val_utterances + DECODE_S * val_wer_samples)
    return RUN_OVERHEAD_S + steps + val


def eval_seconds(cells: int, utterances: int, num_beams: int = 1, calls: int = 1) -> float:
    per = DECODE_S * (1.0 if num_beams <= 1 else BEAM_FACTOR * num_beams)
    return calls * EVAL_LOAD_S + cells * utterances * per


def plan_rows(items: List[Dict]) -> List[Dict]:
    """``items``: one dict per stage, ``{"stage", "what", "seconds"}``; adds the running total (minutes)."""
    total = 0.0
    out = []
    for it in items:
        total += it["seconds"]
        out.append({**it, "minutes": round(it["seconds"] / 60, 1), "total_minutes": round(total / 60, 1)})
    return out


def format_plan(rows: Sequence[Dict]) -> str:
    lines = [f"{'stage':<10}{'what':<46}{'min':>7}{'total':>8}", "-" * 71]
    for r in rows:
        lines.append(f"{r['stage']:<10}{r['what']:<46}{r['minutes']:>7.1f}{r['total_minutes']:>8.1f}")
    return "\n".join(lines)
