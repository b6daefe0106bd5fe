"""A one-page Markdown report of an expert-activation analysis, embedding the figures of ``analysis.plots``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

Runs = Sequence[Tuple[str, dict]]

CAPTIONS = {
    "usage_all": "Expert usage (fraction of top-k selections) per layer, one panel per scale, all non-pad tokens.",
    "usage_audio": "The same for audio tokens only.",
    "usage_video": "The same for video tokens only.",
    "modality_usage": "Expert usage by modality, averaged over layers and scales; dashed line = uniform.",
    "consistency": "Cross-scale consistency per layer: JSD of usage distributions (0 = identical), top-k overlap of "
    "a coarse token with the fine tokens it pools, top-1 agreement; mean over scale pairs, shaded min-max.",
    "entropy_balance": "Router entropy per layer by modality, and the coefficient of variation of expert load.",
    "similarity": "Cosine similarity between the tokens of one utterance at two compression rates.",
}


def _fmt(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _mean(values) -> Optional[float]:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def headline(stats: dict) -> Dict[str, Optional[float]]:
    """The report's numbers for one run (means over layers, scales and scale pairs; all tokens)."""
    s = stats["summary"]
    return {
        "cross_scale_jsd": s["cross_scale_jsd"],
        "cross_layer_jsd": s["cross_layer_jsd"],
        "topk_overlap": s["topk_overlap"],
        "top1_agreement": s["top1_agreement"],
        "topk_overlap_baseline": s.get("topk_overlap_baseline"),
        "top1_agreement_baseline": s.get("top1_agreement_baseline"),
        "entropy": _mean(s["entropy_by_scale"].values()),
        "load_cv": _mean(s["load_cv_by_scale"].values()),
    }


def _reading(label: str, stats: dict) -> List[str]:
    """Plain statements of what the numbers say (no thresholds, no claims beyond the numbers)."""
    h, ch = headline(stats), stats["meta"]["chance"]
    out = []
    if h["cross_scale_jsd"] is not None and h["cross_layer_jsd"] is not None:
        ratio = h["cross_layer_jsd"] / h["cross_scale_jsd"] if h["cross_scale_jsd"] > 0 else float("inf")
        out.append(
            f"**{label}**: within a layer, the expert-usage distributions of different scales differ by JSD "
            f"{_fmt(h['cross_scale_jsd'])} bits on average; between layers of the same scale by "
            f"{_fmt(h['cross_layer_jsd'])} ({ratio:.1f}x)."
        )
    if h["topk_overlap"] is not None:
        out.append(
            f"**{label}**: a coarse token shares {100 * h['topk_overlap']:.1f}% of its top-{stats['meta']['top_k']} "
            f"experts with the fine tokens it pools (independent routing with the same usage: "
            f"{100 * h['topk_overlap_baseline']:.1f}%, uniform: {100 * ch['topk_overlap']:.1f}%); top-1 agrees for "
            f"{100 * h['top1_agreement']:.1f}% (independent: {100 * h['top1_agreement_baseline']:.1f}%, uniform: "
            f"{100 * ch['top1_agreement']:.1f}%)."
        )
    if h["entropy"] is not None:
        out.append(
            f"**{label}**: mean router entropy {_fmt(h['entropy'])} nats of at most "
            f"{_fmt(stats['summary']['max_entropy'])}; mean load CV {_fmt(h['load_cv'])} (0 = balanced)."
        )
    return out


def write_report(
    out_dir,
    runs: Runs,
    figures: Dict[str, Path],
    similarity: Optional[Sequence[dict]] = None,
    title: str = "Expert activation analysis",
    notes: Sequence[str] = (),
) -> Path:
    """Write ``out_dir/report.md``. ``similarity`` items are ``analysis.stats.similarity_summary`` dicts with a
    ``title`` key. Figure paths are embedded relative to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    for label, st in runs:
        m = st["meta"]
        tm = m.get("trace_meta", {})
        tokens = sum(v.get("all", 0) for v in st["tokens"].values())
        lines.append(
            f"- **{label}**: checkpoint `{tm.get('checkpoint', '?')}`, split `{tm.get('split', '?')}`, "
            f"noise {tm.get('snr', 'clean')}, {tm.get('utterances', '?')} utterances, {tokens} routed tokens; "
            f"{m['num_experts']} routed experts, top-{m['top_k']}, {m['num_layers']} layers; scales "
            f"{', '.join(m['scales'])}."
        )
    lines += ["", "## Headline numbers", ""]
    rows = [
        ("cross-scale usage JSD (bits; same layer)", "cross_scale_jsd", "0 = identical"),
        ("cross-layer usage JSD (bits; same scale)", "cross_layer_jsd", "0 = identical"),
        ("top-k overlap, coarse vs pooled fine", "topk_overlap", "uniform {topk_overlap:.3f}"),
        ("top-k overlap, independent-routing baseline", "topk_overlap_baseline", "same usage, no token link"),
        ("top-1 agreement across scales", "top1_agreement", "uniform {top1_agreement:.3f}"),
        ("top-1 agreement, independent-routing baseline", "top1_agreement_baseline", "same usage, no token link"),
        ("router entropy (nats)", "entropy", "max {max_entropy:.3f}"),
        ("load CV", "load_cv", "0 = balanced"),
    ]
    heads = [headline(st) for _, st in runs]
    ref = {**runs[0][1]["meta"]["chance"], "max_entropy": runs[0][1]["summary"]["max_entropy"]}
    lines.append("| metric | " + " | ".join(label for label, _ in runs) + " | reference |")
    lines.append("|---|" + "---|" * (len(runs) + 1))
    for name, key, refmt in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(h[key]) for h in heads) + f" | {refmt.format(**ref)} |")
    lines += ["", "## What the numbers say", ""]
    for label, st in runs:
        lines += [f"- {s}" for s in _reading(label, st)]
    lines += [f"- {n}" for n in notes]
    if similarity:
        lines += ["", "## Token similarity across rates", "",
                  "| pair | tokens | mean sim. (overlapping spans) | mean sim. (others) | argmax in span |",
                  "|---|---|---|---|---|"]
        for s in similarity:
            lines.append(
                f"| {s.get('title', '')} | {s['shape'][0]}x{s['shape'][1]} | {_fmt(s['band_mean'])} | "
                f"{_fmt(s['off_band_mean'])} | {_fmt(s['argmax_in_span'])} |"
            )
    lines += ["", "## Figures", ""]
    for name, path in figures.items():
        rel = os.path.relpath(Path(path), out_dir)
        lines += [f"![{name}]({rel})", "", f"*{CAPTIONS.get(name, name)}*", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
