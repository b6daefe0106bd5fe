"""Gather what the stages of a comparison wrote under ``<out>/work`` into ``<out>/results.json``.

``results.json`` is everything the report needs, so that tables, plots and the page can be redrawn from the results
folder alone (``--report-only``), without the run folders:

* ``meta``: date, command (and earlier commands on the same folder), machine, git commit, wall seconds;
* ``spec``: the plan (``Spec.summary``) and ``plan``: the time estimate of each stage;
* ``runs``: per run its method, seed, scales, budget, training record (steps, utterances, epoch, wall seconds),
  parameter counts, the last validation record and the timing of each evaluation (utterances per second);
* ``records``: the evaluation records (``mome.evaluation.tables``) of every run, with ``run_id``, ``key``, ``seed``,
  ``kind`` (clean / noise / beam) and ``num_beams`` added; ``judge``: the judge's records;
* ``protocol``: split, utterance count, noise, WER normalisation, decoding of the evaluation;
* ``extra_seeds``: which method got the extra seeds and why; ``routing``: the routing runs and their headline
  numbers; ``reference_params``: the same methods' counts on the paper's LLM.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import List, Optional

from .spec import Run


def _maybe(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def last_validation(run_dir: Path) -> Optional[dict]:
    """The last ``split == "val"`` record of the run's metrics.jsonl (loss, WER and reading gap per scale)."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return None
    last = None
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("split") == "val":
            last = rec
    if last is None:
        return None
    return {k: last[k] for k in ("step", "loss", "wer", "reading_gap", "train_wall_s") if k in last}


def run_entry(comp, run: Run) -> dict:
    cfg = comp.cfg(run)
    from .compare import model_scales

    pos = comp.checkpoint_position(comp.spec.run_dir(run)) or {}
    return {
        "run_id": run.run_id,
        "key": run.method.key,
        "label": run.method.label,
        "row": run.method.row,
        "seed": run.seed,
        "method": cfg.model.method,
        "router": cfg.model.mome.router,
        "tasks": list(cfg.model.tasks),
        "scales": model_scales(cfg),
        "budget": {"max_steps": int(cfg.train.max_steps), "max_minutes": float(cfg.train.max_minutes)},
        "clean_epochs": int(cfg.data.transforms.clean_epochs),
        "train": {**(_maybe(comp.state(run, "train")) or {}), "epoch": pos.get("epoch")},
        "params": _maybe(comp.state(run, "params")),
        "validation": last_validation(comp.spec.run_dir(run)),
        "eval": {kind: _maybe(comp.eval_dir(run, kind) / "timing.json") for kind in ("clean", "noise", "beam")
                 if (comp.eval_dir(run, kind) / "timing.json").is_file()},
    }


def eval_records(comp, run: Run) -> List[dict]:
    out = []
    for kind in ("clean", "noise", "beam"):
        d = comp.eval_dir(run, kind)
        res, timing = _maybe(d / "results.json"), _maybe(d / "timing.json")
        if res is None or timing is None:
            continue
        for r in res["results"]:
            out.append({**r, "run_id": run.run_id, "key": run.method.key, "seed": run.seed, "kind": kind,
                        "num_beams": timing["num_beams"],
                        "hypotheses": str(Path("work") / "eval" / run.run_id / kind / r["hypotheses"])})
    return out


def protocol(comp, runs: List[Run]) -> dict:
    for run in runs:
        res = _maybe(comp.eval_dir(run, "clean") / "results.json")
        if res:
            m = res["meta"]
            n = sorted({r["num_utterances"] for r in res["results"]})
            return {"split": m.get("split"), "utterances": n, "max_utterances": m.get("max_utterances"),
                    "noise": m.get("noise"), "noise_seed": m.get("noise_seed"),
                    "normalisation": (m.get("normalisation") or {}).get("name"), "decoding": m.get("decoding")}
    return {}


def collect(comp, command: str, seconds: float) -> Path:
    """Write ``<out>/results.json`` from ``comp.work``; earlier commands on the folder are kept in ``history``."""
    spec = comp.spec
    out = spec.out / "results.json"
    previous = _maybe(out) or {}
    history = list(previous.get("meta", {}).get("history", []))
    if previous.get("meta", {}).get("command"):
        history.append({"command": previous["meta"]["command"], "created": previous["meta"].get("created")})
    from .compare import git_state, machine

    runs = comp.all_runs()
    judge_dir = comp.work / "eval" / "judge"
    doc = {
        "meta": {"created": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
                 "history": history[-10:], "seconds_this_call": round(seconds, 1), "machine": machine(),
                 "git": git_state(), "out": str(spec.out)},
        "spec": spec.summary(),
        "plan": comp.plan(),
        "extra_seeds": _maybe(comp.work / "state" / "extra_seeds.json"),
        "runs": [run_entry(comp, r) for r in runs],
        "records": [rec for r in runs for rec in eval_records(comp, r)],
        "judge": _maybe(judge_dir / "records.json") or [],
        "judge_timing": _maybe(judge_dir / "timing.json"),
        "protocol": protocol(comp, runs),
        "routing": _maybe(comp.work / "state" / "routing.json") or [],
        "reference_params": _maybe(comp.work / "state" / "reference_params.json") or [],
    }
    for r in doc["judge"]:
        r["hypotheses"] = str(Path("work") / "eval" / "judge" / r["hypotheses"])
    tmp = out.with_name("results.json.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(out)
    return out
