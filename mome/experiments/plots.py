"""The comparison's figures (PNG via matplotlib's Agg backend), in the style of ``mome.evaluation.plots``.

* ``plot_wer_vs_scale``: clean WER against the LLM input tokens per second of media (log axis) at each AVSR pair,
  one line per table row (single-pair models as points), error bars = the range over seeds; the Whisper judge as a
  dashed grey line.
* ``plot_wer_vs_snr``: one panel per noisy AVSR pair, WER from clean to the lowest SNR, one line per method with
  that pair, the audio-only model at the same audio rate dashed, the judge dashed grey.
* ``plot_routing_divergence``: cross-scale and cross-layer JSD of expert usage, and top-k overlap against the
  independent-routing baseline, for the trained MoME (range over seeds), its step-0 weights and the per-scale
  router.
* ``routing_figures``: ``analysis.plots`` (per-layer usage heatmaps per scale, per-layer consistency) for the
  trained MoME's first seed, its step-0 weights and the ablation, drawn from ``routing/<name>/stats.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # noqa: E402

from ..evaluation.plots import JUDGE_STYLE  # noqa: E402


def _save(fig, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _colors() -> List[str]:
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _err(cells) -> np.ndarray:
    """[2, n] lower / upper error bar lengths (percent) from the seed range of each cell."""
    return np.array([[100 * (c.mean - c.lo) for c in cells], [100 * (c.hi - c.mean) for c in cells]])


def plot_wer_vs_scale(R, path) -> Path:
    from .report import pair_label, row_groups

    pairs = R.ev["pairs"]
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    colors = _colors()
    annotated = set()
    for i, (row, keys) in enumerate(row_groups(R)):
        pts = []
        for p in pairs:
            c = next((R.cell(k, p) for k in keys if R.cell(k, p)), None)
            if c is not None and R.tps.get(p):
                pts.append((R.tps[p], c, p))
        if not pts:
            continue
        pts.sort(key=lambda t: t[0])
        xs, cells = [t[0] for t in pts], [t[1] for t in pts]
        ys = [100 * c.mean for c in cells]
        color = colors[i % len(colors)]
        single = len(keys) > 1 or len(pts) == 1  # one model per pair: points, not a curve
        ax.errorbar(xs, ys, yerr=_err(cells), marker="o", ms=5, capsize=3, color=color,
                    linestyle="none" if single else "-", label=row)
        for x, y, (_, _, p) in zip(xs, ys, pts):
            if p not in annotated:  # once per pair
                annotated.add(p)
                ax.annotate(pair_label(p), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    j = R.judge.get("clean")
    if j:
        ax.axhline(100 * j["wer"], label=j["method"], **JUDGE_STYLE)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("LLM input tokens per second of media (audio 50/rate + video 25/rate)")
    ax.set_ylabel("WER (%), clean")
    ax.set_title("WER against scale (error bars: range over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_wer_vs_snr(R, path) -> Path:
    from .report import pair_label, snr_title

    snrs = ["clean"] + list(R.ev["snrs"])
    panels = [s for s in R.ev["noise_scales"] if s.startswith("avsr:")]
    audio_of = {av: a for av, a in ((R.claims.get("audio_only") or {}).get("pairs") or [])}
    ao_key = (R.claims.get("audio_only") or {}).get("method")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), squeeze=False)
    colors = _colors()
    x = np.arange(len(snrs))
    for ax, scale in zip(axes[0], panels):
        for i, m in enumerate(R.methods):
            cells = [R.cell(m["key"], scale, s) for s in snrs]
            if not any(cells[1:]):
                continue
            idx = [k for k, c in enumerate(cells) if c is not None]
            cs = [cells[k] for k in idx]
            ax.errorbar(x[idx], [100 * c.mean for c in cs], yerr=_err(cs), marker="o", ms=4, capsize=3,
                        color=colors[i % len(colors)], label=m["label"])
        a = audio_of.get(scale)
        if a and ao_key:
            cells = [R.cell(ao_key, a, s) for s in snrs]
            idx = [k for k, c in enumerate(cells) if c is not None]
            if idx:
                i = [m["key"] for m in R.methods].index(ao_key)
                ax.plot(x[idx], [100 * cells[k].mean for k in idx], marker="s", ms=4, linestyle="--",
                        color=colors[i % len(colors)], label=f"{R.labels[ao_key]} {a}")
        js = [R.judge.get(s) for s in snrs]
        idx = [k for k, j in enumerate(js) if j is not None]
        if idx:
            ax.plot(x[idx], [100 * js[k]["wer"] for k in idx], label=js[idx[0]]["method"], **JUDGE_STYLE)
        ax.set_xticks(x, [snr_title(s) for s in snrs])
        ax.set_xlabel("babble SNR")
        ax.set_ylabel("WER (%)")
        ax.set_title(f"AVSR {pair_label(scale)}" + (f" (audio-only at {a})" if a else ""))
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=6)
    fig.suptitle("WER against SNR (error bars: range over seeds)")
    return _save(fig, path)


def plot_routing_divergence(entries: Sequence[Dict], path) -> Path:
    """Bars per routing run: cross-scale / cross-layer JSD, and top-k overlap against independent routing."""
    groups: Dict[str, List[Dict]] = {}
    n_trained = sum(1 for e in entries if e["role"] == "trained")
    for e in entries:  # the trained seeds of one method are one bar (mean, range)
        name = (e["label"].rsplit(" (seed", 1)[0] + f" (trained, {n_trained} seed{'s' * (n_trained > 1)})"
                if e["role"] == "trained" else e["label"])
        groups.setdefault(name, []).append(e["headline"])

    def stat(hs, key):
        v = [h[key] for h in hs if h.get(key) is not None]
        return (float(np.mean(v)), float(np.min(v)), float(np.max(v))) if v else (np.nan, np.nan, np.nan)

    names = list(groups)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    w = 0.38
    for off, key, label in ((-w / 2, "cross_scale_jsd", "across scales (same layer)"),
                            (w / 2, "cross_layer_jsd", "across layers (same scale)")):
        s = [stat(groups[n], key) for n in names]
        axes[0].bar(x + off, [m for m, _, _ in s], w, yerr=[[m - lo for m, lo, _ in s], [hi - m for m, _, hi in s]],
                    capsize=3, label=label)
    axes[0].set_ylabel("JSD of expert usage (bits)")
    axes[0].set_title("Usage divergence (lower = more alike)", fontsize=10)
    for off, key, label in ((-w / 2, "topk_overlap", "top-k overlap, coarse vs pooled fine"),
                            (w / 2, "topk_overlap_baseline", "independent-routing baseline")):
        s = [stat(groups[n], key) for n in names]
        axes[1].bar(x + off, [m for m, _, _ in s], w, yerr=[[m - lo for m, lo, _ in s], [hi - m for m, _, hi in s]],
                    capsize=3, label=label, hatch="//" if "baseline" in key else None, alpha=0.6 if "baseline" in key
                    else 1.0)
    axes[1].set_ylabel("fraction of top-k experts shared")
    axes[1].set_title("Token-level agreement across rates", fontsize=10)
    for ax in axes:
        ax.set_xticks(x, [n.replace(" (", "\n(") for n in names], fontsize=7)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def routing_figures(entries: Sequence[Dict], out: Path) -> Dict[str, Path]:
    """``analysis.expert_activation.render`` over the first trained seed, the step-0 weights and the ablation."""
    from analysis.expert_activation import render

    chosen = []
    for role in ("trained", "initial", "ablation"):
        e = next((e for e in entries if e["role"] == role), None)
        if e is not None and (Path(out) / e["stats"]).is_file():
            chosen.append((e["label"], Path(out) / Path(e["stats"]).parent))
    if not chosen:
        return {}
    render(Path(out) / "routing", chosen)
    figs = {}
    for name, title in (("usage_all", "expert usage per layer and scale"), ("consistency", "routing consistency")):
        p = Path(out) / "routing" / f"{name}.png"
        if p.is_file():
            figs[title] = p
    return figs
