"""Expert usage of the trained MoME against its step-0 weights and against the per-scale-router ablation.

Each routing run is one ``analysis.expert_activation`` analysis (teacher-forced over the first
``analysis.max_utterances`` test utterances at every scale, clean): a trace and ``stats.json`` under
``<out>/work/routing/<name>/``:

* ``trained``: the final checkpoint of every seed of ``routing.method`` (the seeds give the spread of the numbers);
* ``initial``: seed 0 of the same method before its first step: the model rebuilt from the run's saved config with
  the run's ``train.seed`` (the trainer seeds the same way before building the model, so these are its initial
  trainable weights). It says how much of the cross-scale agreement is there before any training;
* ``ablation``: the final checkpoint of ``routing.ablation`` (``model.mome.router=per_scale``).

The statistics (``analysis.stats``: usage per layer and scale, JSD across scales and across layers, top-k overlap
with its independent-routing baseline) are copied, without the bulky per-expert gate and probability tables, to
``<out>/routing/<name>/stats.json``, from which ``mome.experiments.report`` draws the figures (``analysis.plots``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List

from .spec import Run

KEEP = ("meta", "tokens", "usage", "load_cv", "entropy", "jsd", "topk_overlap", "top1_agreement",
        "topk_overlap_baseline", "top1_agreement_baseline", "token_pairs", "summary")


def analyse_initial(run_dir: Path, out_dir: Path, label: str) -> Path:
    """``analysis.expert_activation.analyse_checkpoint`` for the weights a run starts from (nothing loaded)."""
    from accelerate.utils import set_seed

    from analysis.expert_activation import save_run, trace_model
    from analysis.stats import compute_stats
    from mome.config import load_saved_config, parse_snr
    from mome.data import build_dataloader
    from mome.models import build_model
    from mome.scales import select_scales

    cfg = load_saved_config(Path(run_dir) / "config.yaml")
    a = cfg.analysis
    if parse_snr(a.snr) is not None:
        raise ValueError(f"{run_dir}: the step-0 routing analysis runs on clean audio (analysis.snr is {a.snr})")
    set_seed(int(cfg.train.seed))  # as the trainer does right before it builds the model
    model = build_model(cfg)
    model.eval()
    scales = select_scales(cfg.model, list(cfg.eval.scales))
    loader = build_dataloader(cfg, cfg.eval.split, train=False, max_utterances=a.max_utterances)
    meta = {"label": label, "checkpoint": f"{run_dir} at step 0 (rebuilt with train.seed={cfg.train.seed})",
            "split": cfg.eval.split, "snr": "clean", "noise_type": None, "method": cfg.model.method,
            "router": cfg.model.mome.router, "scales_run": [s.name for s in scales]}
    t0 = time.time()
    reader, sims = trace_model(model, loader, scales, out_dir, layers=list(a.layers), store_probs=a.store_probs,
                               utterances_per_shard=a.utterances_per_shard, similarity_utterances=0,
                               meta=meta, progress=bool(cfg.logging.progress))
    stats = compute_stats(reader, scales=[s.name for s in scales])
    stats["meta"]["trace_seconds"] = round(time.time() - t0, 1)
    save_run(Path(out_dir), stats, sims)
    return Path(out_dir)


def export_stats(src: Path, dst: Path) -> Path:
    """``src/stats.json`` without the per-expert gate shares and mean probabilities, to ``dst/stats.json``."""
    st = json.loads((Path(src) / "stats.json").read_text())
    slim = {k: st[k] for k in KEEP if k in st}
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "stats.json").write_text(json.dumps(slim, allow_nan=False) + "\n")
    return dst / "stats.json"


def routing_runs(spec) -> List[dict]:
    """The routing runs of a spec: ``{"name", "label", "role", "run": Run}`` (none without ``routing.method``)."""
    out = []
    key = spec.routing.get("method")
    if not key:
        return out
    m = spec.method(key)
    for s in m.seeds:
        out.append({"name": f"{key}_s{s}", "label": f"{m.label} (seed {s})", "role": "trained", "run": Run(m, s)})
    out.append({"name": f"{key}_s{m.seeds[0]}_step0", "label": f"{m.label} at step 0", "role": "initial",
                "run": Run(m, m.seeds[0])})
    if spec.routing.get("ablation"):
        a = spec.method(spec.routing["ablation"])
        out.append({"name": f"{a.key}_s{a.seeds[0]}", "label": f"{a.label} (seed {a.seeds[0]})", "role": "ablation",
                    "run": Run(a, a.seeds[0])})
    return out


def routing_stage(comp) -> List[dict]:
    """Analyse every routing run not analysed yet; export the statistics; write ``work/state/routing.json``."""
    from analysis.expert_activation import analyse_checkpoint
    from analysis.report import headline

    from .compare import say, write_json

    spec = comp.spec
    entries = []
    for r in routing_runs(spec):
        work_dir = comp.work / "routing" / r["name"]
        run_dir = spec.run_dir(r["run"])
        seconds = None
        if not (work_dir / "stats.json").is_file():
            say(f"routing: {r['label']}")
            t0 = time.perf_counter()
            if r["role"] == "initial":
                analyse_initial(run_dir, work_dir, r["label"])
            else:
                analyse_checkpoint(str(run_dir), work_dir, None, [], r["label"])
            seconds = round(time.perf_counter() - t0, 1)
        export_stats(work_dir, spec.out / "routing" / r["name"])
        st = json.loads((work_dir / "stats.json").read_text())
        entries.append({"name": r["name"], "label": r["label"], "role": r["role"], "key": r["run"].method.key,
                        "seed": r["run"].seed, "stats": str(Path("routing") / r["name"] / "stats.json"),
                        "headline": headline(st), "seconds": seconds,
                        "utterances": st["meta"].get("trace_meta", {}).get("utterances")})
    previous = {e["name"]: e for e in (json.loads((comp.work / "state" / "routing.json").read_text())
                                       if (comp.work / "state" / "routing.json").is_file() else [])}
    for e in entries:  # keep the time of the call that made the trace
        if e["seconds"] is None and e["name"] in previous:
            e["seconds"] = previous[e["name"]].get("seconds")
    write_json(comp.work / "state" / "routing.json", entries)
    return entries
