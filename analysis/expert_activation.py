"""Expert-activation analysis of a MoME checkpoint: which experts fire for which scale, modality and layer.

    python -m analysis.expert_activation --checkpoint runs/demo --split test --out runs/demo/analysis
    python -m analysis.expert_activation --checkpoint runs/shared --compare runs/per_scale --out analysis/router
    python -m analysis.expert_activation --checkpoint runs/demo --out DIR analysis.snr=0 analysis.max_utterances=50

For each checkpoint the split (``eval.split``, or ``--split``) is run teacher-forced (the reference transcript in the
prompt, no decoding) at every scale (``eval.scales``; default all the model trains), optionally with noise
(``analysis.snr``; noise of type ``data.noise.type``), inside ``model.record_routing()``. Written per run under
``OUT/<label>/``: ``trace/`` (``analysis.trace`` format), ``stats.json`` (``analysis.stats.compute_stats`` plus
token similarity summaries) and ``similarity.npz``; then ``OUT/*.png`` and ``OUT/report.md`` for one run or, with
``--compare``, both in the same figures. ``key=value`` overrides apply over each checkpoint's own config.
``--reuse`` redraws the figures and report from existing run folders without running the model again.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from analysis import collect, plots, report
from analysis.stats import compute_stats
from analysis.trace import TraceReader, TraceWriter
from mome.config import parse_snr
from mome.scales import Scale, select_scales


def trace_model(
    model,
    loader,
    scales: Sequence[Scale],
    out_dir: str | os.PathLike,
    *,
    layers: Sequence[int] = (),
    store_probs: bool = True,
    utterances_per_shard: int = 64,
    similarity_utterances: int = 2,
    similarity_layers: Sequence[int] = (-1,),
    meta: Optional[dict] = None,
    progress: bool = True,
) -> Tuple[TraceReader, List[dict]]:
    """Run ``model`` teacher-forced over ``loader`` at ``scales`` and write the routing trace to ``out_dir/trace``.

    Returns the trace reader and the similarity entries (``analysis.collect.similarity_matrices``) of the first
    ``similarity_utterances`` utterances, for ``similarity_layers`` (-1 = projector outputs).
    """
    out_dir = Path(out_dir)
    num_layers = len(collect.decoder_layers(model.llm))
    keep_layers = list(layers) if layers else list(range(num_layers))
    bad = [x for x in keep_layers if not 0 <= x < num_layers]
    if bad:
        raise ValueError(f"analysis.layers {bad} out of range: the LLM has {num_layers} layers")
    if model.mome is None:
        raise RuntimeError(f"method '{model.method}' has no router; a routing trace needs mome or mome_i")
    writer = TraceWriter(out_dir / "trace", scales=model.scales, layers=keep_layers,
                         num_experts=model.mome[0].num_experts, top_k=model.mome[0].top_k, with_probs=store_probs,
                         utterances_per_shard=utterances_per_shard, meta=meta, overwrite=True)
    sims: List[dict] = []
    sim_done: Dict[str, None] = {}
    n_utts = 0
    try:
        total = len(loader)
    except TypeError:
        total = None
    bar = tqdm(loader, total=total, desc="routing trace", unit="batch", disable=not progress)
    with collect.no_grad_eval(model):
        for batch in bar:
            ids = [str(i) for i in batch["ids"]]
            want_sim = len(sim_done) < similarity_utterances and similarity_layers
            hs = collect.HiddenStates(model.llm, similarity_layers if want_sim else [])
            with model.record_routing() as log, hs:
                model(batch, scales=list(scales))
            if len(log.calls) != 1:
                raise RuntimeError(f"model.record_routing() logged {len(log.calls)} calls for one forward")
            call = log.calls[0]
            for rec in call.records():
                rec["topk_ids"], rec["topk_gates"] = rec["topk_ids"][:, keep_layers], rec["topk_gates"][:, keep_layers]
                rec["probs"] = rec["probs"][:, keep_layers] if store_probs else None
                writer.add(**rec)
            writer.end_batch()
            if want_sim:
                sims += _call_similarity(hs, call, model.scales, sim_done, similarity_utterances)
            n_utts += len(ids)
            bar.set_postfix(utterances=n_utts)
    bar.close()
    writer.header["meta"]["utterances"] = n_utts
    writer.close()
    return TraceReader(out_dir / "trace"), sims


def _call_similarity(hs, call, model_scales, done: Dict[str, None], limit: int) -> List[dict]:
    """Similarity matrices of the call's first utterances (up to ``limit`` in all) from captured hidden states."""
    out = []
    B = len(call.utterance_ids)
    keep = call.attention_mask.bool().numpy()
    roles = call.roles.numpy()
    for b, utt in enumerate(call.utterance_ids):
        if len(done) >= limit:
            break
        done[utt] = None
        rows = range(b, roles.shape[0], B)  # row k * B + b is utterance b at the k-th scale
        for layer, states in sorted(hs.states.items()):
            per_scale = {model_scales[int(call.scale_ids[r])]: (roles[r][keep[r]], states[r].numpy()[keep[r]])
                         for r in rows}
            source = "projector" if layer == -1 else f"layer {layer}"
            out += collect.similarity_matrices(per_scale, source, utt)
    return out


# ----------------------------------------------------------------------------------------------------------------


def run_label(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    return p.parent.parent.name if p.name.startswith("step_") and p.parent.name == "checkpoints" else p.name


def analyse_checkpoint(checkpoint: str, out_dir: Path, split: Optional[str], overrides: Sequence[str],
                       label: str) -> Path:
    """Trace, statistics and similarity for one checkpoint into ``out_dir``; returns ``out_dir``."""
    from mome.data import build_dataloader
    from mome.config import MOME_METHODS
    from mome.models.checkpoints import latest_checkpoint, load_model

    ov = list(overrides) + ([f"eval.split={split}"] if split else [])
    ckpt = latest_checkpoint(checkpoint)
    cfg, model = load_model(ckpt, ov)
    if cfg.model.method not in MOME_METHODS:
        raise SystemExit(f"{ckpt}: method '{cfg.model.method}' has no router; expert analysis needs "
                         f"one of {', '.join(MOME_METHODS)}")
    a, split = cfg.analysis, cfg.eval.split
    try:
        scales = select_scales(cfg.model, list(cfg.eval.scales))
        snr = parse_snr(a.snr)
    except ValueError as exc:
        raise SystemExit(f"{ckpt}: analysis config: {exc}") from None
    loader = build_dataloader(cfg, split, train=False, snr=snr, max_utterances=a.max_utterances)  # data.noise
    meta = {"label": label, "checkpoint": str(ckpt), "split": split, "snr": "clean" if snr is None else snr,
            "noise_type": cfg.data.noise.type if snr is not None else None, "method": cfg.model.method,
            "router": cfg.model.mome.router, "scales_run": [s.name for s in scales]}
    t0 = time.time()
    reader, sims = trace_model(model, loader, scales, out_dir, layers=list(a.layers), store_probs=a.store_probs,
                               utterances_per_shard=a.utterances_per_shard,
                               similarity_utterances=a.similarity_utterances,
                               similarity_layers=list(a.similarity_layers), meta=meta, progress=cfg.logging.progress)
    stats = compute_stats(reader, scales=[s.name for s in scales], progress=cfg.logging.progress)
    stats["meta"]["trace_seconds"] = round(time.time() - t0, 1)
    save_run(out_dir, stats, sims)
    return out_dir


def save_run(out_dir: Path, stats: dict, sims: Sequence[dict]) -> None:
    """``stats.json`` (with ``similarity``: the summaries) and ``similarity.npz`` (the matrices, keyed by index)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = dict(stats)
    stats["similarity"] = [{k: v for k, v in s.items() if k != "sim"} | {"key": str(i)} for i, s in enumerate(sims)]
    np.savez_compressed(out_dir / "similarity.npz", **{str(i): s["sim"] for i, s in enumerate(sims)})
    tmp = out_dir / "stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=1, allow_nan=False))
    os.replace(tmp, out_dir / "stats.json")


def load_run(run_dir: Path) -> Tuple[dict, List[dict]]:
    """``(stats, similarity entries with their matrices)`` from a folder written by ``save_run``."""
    path = Path(run_dir) / "stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run python -m analysis.expert_activation first")
    stats = json.loads(path.read_text())
    sims = []
    npz = Path(run_dir) / "similarity.npz"
    if stats.get("similarity") and npz.is_file():
        with np.load(npz) as z:
            sims = [dict(s, sim=z[s["key"]]) for s in stats["similarity"]]
    return stats, sims


def render(out_dir: Path, runs: Sequence[Tuple[str, Path]], max_similarity_panels: int = 4) -> Path:
    """Figures and ``report.md`` in ``out_dir`` from the run folders ``runs`` = [(label, folder)]."""
    loaded = [(label, *load_run(d)) for label, d in runs]
    stat_runs = [(label, st) for label, st, _ in loaded]
    panels, summaries = [], []
    for label, _, sims in loaded:
        first = sims[0]["utterance"] if sims else None
        for s in sims:
            name = f"{label}: {s['modality']} {s['source']}, rate {s['coarse_rate']} vs {s['fine_rate']}"
            summaries.append({**s["summary"], "title": f"{name} ({s['utterance']})"})
            if s["utterance"] == first and len(panels) < max_similarity_panels:
                panels.append({"sim": s["sim"], "title": f"{name}\n{s['utterance']}",
                               "rows_label": f"{s['modality']} tokens at rate {s['coarse_rate']}",
                               "cols_label": f"{s['modality']} tokens at rate {s['fine_rate']}"})
    figs = plots.plot_all(stat_runs, out_dir, similarity=panels)
    title = "Expert activation analysis: " + " vs ".join(label for label, _ in runs)
    return report.write_report(out_dir, stat_runs, figs, similarity=summaries, title=title)


def _labels(paths: Sequence[str], given: Optional[Sequence[str]]) -> List[str]:
    if given:
        if len(given) != len(paths):
            raise SystemExit(f"--labels: give {len(paths)} labels, got {len(given)}")
        return list(given)
    labels = [run_label(p) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{lab}-{i}" for i, lab in enumerate(labels)]
    return labels


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.expert_activation", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder (newest checkpoint) or checkpoint folder")
    parser.add_argument("--compare", default=None, help="a second run or checkpoint, drawn in the same figures")
    parser.add_argument("--split", default=None, help="data split (default: eval.split of the config)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--labels", nargs="+", default=None, help="names of the runs in figures (default: run names)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip a run whose OUT/<label>/stats.json exists; only redraw the figures and report")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides over each checkpoint's config, e.g. analysis.snr=0")
    args = parser.parse_args(argv)
    paths = [args.checkpoint] + ([args.compare] if args.compare else [])
    labels = _labels(paths, args.labels)
    out = Path(args.out)
    runs = []
    for path, label in zip(paths, labels):
        if args.reuse and (out / label / "stats.json").is_file():
            print(f"[analysis] {label}: reusing {out / label / 'stats.json'}")
            runs.append((label, out / label))
            continue
        print(f"[analysis] {label}: {path}")
        runs.append((label, analyse_checkpoint(path, out / label, args.split, args.overrides, label)))
    path = render(out, runs)
    print(f"[analysis] report: {path}")


if __name__ == "__main__":
    main()
