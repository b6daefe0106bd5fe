"""Figures of routing statistics (``analysis.stats`` output), PNG via matplotlib's Agg backend.

Every function takes ``runs``: a list of ``(label, stats)`` pairs, one per checkpoint (one pair for a single
model; two to compare, e.g. shared vs per-scale router, in the same figure), and the output path. Each returns the
path written.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Runs = Sequence[Tuple[str, dict]]
GROUP_LABEL = {"all": "all tokens", "audio": "audio tokens", "video": "video tokens", "text": "text tokens",
               "transcript": "transcript tokens"}
_LINESTYLES = ["-", "--", ":", "-."]
_GROUP_COLOURS = {"audio": "tab:blue", "video": "tab:orange", "text": "tab:green", "transcript": "tab:green",
                  "all": "tab:gray"}


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _layer_labels(stats: dict) -> List[int]:
    return list(stats["meta"].get("layers") or range(stats["meta"]["num_layers"]))


def _layer_ticks(ax, layers, axis="y"):
    step = max(1, len(layers) // 12)
    idx = list(range(0, len(layers), step))
    if axis == "y":
        ax.set_yticks(idx, [str(layers[i]) for i in idx])
    else:
        ax.set_xticks(idx, [str(layers[i]) for i in idx])


def plot_usage_heatmaps(runs: Runs, path, group: str = "all", scales: Optional[Sequence[str]] = None,
                        max_cols: int = 6) -> Path:
    """Layer x expert heatmaps of expert usage, one panel per scale (wrapped after ``max_cols``), one block of rows
    per run, one shared colour scale."""
    scales = list(scales) if scales else list(dict.fromkeys(s for _, st in runs for s in st["meta"]["scales"]))
    cells = [[np.asarray(st["usage"][s][group]) if group in st["usage"].get(s, {}) else None for s in scales]
             for _, st in runs]
    vmax = max([float(c.max()) for row in cells for c in row if c is not None] or [1.0])
    nc = min(len(scales), max_cols)
    per_run = -(-len(scales) // nc)
    nr = per_run * len(runs)
    fig, axes = plt.subplots(nr, nc, figsize=(2.6 * nc + 1.2, 2.9 * nr + 0.6), squeeze=False, constrained_layout=True)
    im = None
    for r, (label, st) in enumerate(runs):
        layers = _layer_labels(st)
        for c in range(per_run * nc):
            ax = axes[r * per_run + c // nc][c % nc]
            if c >= len(scales):
                ax.set_axis_off()
                continue
            scale, u = scales[c], cells[r][c]
            if u is None:
                ax.text(0.5, 0.5, f"{scale}\nno {GROUP_LABEL.get(group, group)}", ha="center", va="center",
                        transform=ax.transAxes)
                ax.set_axis_off()
                continue
            im = ax.imshow(u, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{scale}" + (f"\n{label}" if len(runs) > 1 else ""), fontsize=9)
            ax.set_xlabel("routed expert")
            if c % nc == 0:
                ax.set_ylabel("LLM layer")
            _layer_ticks(ax, layers)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="fraction of top-k selections")
    title = f"Expert usage per layer and scale ({GROUP_LABEL.get(group, group)})"
    if len(runs) == 1:
        title += f" - {runs[0][0]}"
    fig.suptitle(title)
    return _save(fig, path)


def _mean_usage(st: dict, group: str) -> Optional[np.ndarray]:
    """[E] usage of a group averaged over layers and over scales (weighted by token count)."""
    acc, total = None, 0
    for s, groups in st["usage"].items():
        if group not in groups:
            continue
        n = st["tokens"][s][group]
        u = np.asarray(groups[group]).mean(0) * n
        acc = u if acc is None else acc + u
        total += n
    return None if acc is None else acc / total


def plot_modality_usage(runs: Runs, path, groups: Sequence[str] = ("audio", "video", "text")) -> Path:
    """Per-expert usage bars for each modality group (mean over layers and scales), one panel per run."""
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.8 * len(runs) + 0.5), squeeze=False, constrained_layout=True)
    for r, (label, st) in enumerate(runs):
        ax = axes[r][0]
        E = st["meta"]["num_experts"]
        present = [g for g in groups if _mean_usage(st, g) is not None]
        width = 0.8 / max(1, len(present))
        for i, g in enumerate(present):
            ax.bar(np.arange(E) + (i - (len(present) - 1) / 2) * width, _mean_usage(st, g), width,
                   label=GROUP_LABEL.get(g, g), color=_GROUP_COLOURS.get(g))
        ax.axhline(1.0 / E, color="k", lw=0.8, ls="--", label="uniform")
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7)
        ax.set_xlabel("routed expert")
        ax.set_ylabel("fraction of top-k selections")
        ax.set_title(f"{label}: expert usage by modality (mean over layers and scales)", fontsize=10)
        ax.legend(fontsize=8, ncol=len(present) + 1)
    return _save(fig, path)


def _pair_curves(st: dict, key: str, group: str) -> Optional[np.ndarray]:
    rows = [np.asarray(g[group]) for g in st.get(key, {}).values() if group in g]
    return np.stack(rows) if rows else None


def plot_consistency(runs: Runs, path, group: str = "all") -> Path:
    """Per-layer cross-scale consistency: usage JSD, top-k overlap and top-1 agreement (mean over scale pairs,
    shaded min-max), with the uniform chance level and each run's independent-routing baseline (dotted)."""
    panels = [("jsd", "usage JSD between scales (bits)", None),
              ("topk_overlap", "top-k overlap, coarse vs pooled fine", "topk_overlap"),
              ("top1_agreement", "top-1 agreement across scales", "top1_agreement")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), constrained_layout=True)
    for ax, (key, title, chance) in zip(axes, panels):
        for r, (label, st) in enumerate(runs):
            curves = _pair_curves(st, key, group)
            if curves is None:
                continue
            layers = _layer_labels(st)
            x = np.arange(len(layers))
            line, = ax.plot(x, curves.mean(0), ls=_LINESTYLES[r % 4], marker="o", ms=3,
                            label=f"{label} (mean of {len(curves)} pairs)")
            if len(curves) > 1:
                ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)
            base = _pair_curves(st, key + "_baseline", group) if chance else None
            if base is not None:
                ax.plot(x, base.mean(0), ls=":", lw=1.2, color=line.get_color(),
                        label=f"{label}: independent-routing baseline")
            if chance and r == 0:
                ax.axhline(st["meta"]["chance"][chance], color="k", lw=0.8, ls="--", label="uniform chance")
            _layer_ticks(ax, layers, axis="x")
        ax.set_xlabel("LLM layer")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"Routing consistency across compression rates ({GROUP_LABEL.get(group, group)})")
    return _save(fig, path)


def plot_entropy_and_balance(runs: Runs, path, groups: Sequence[str] = ("audio", "video", "text")) -> Path:
    """Router entropy per layer by modality (mean over scales) and load-balance CV per layer by scale."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
    ax = axes[0]
    for r, (label, st) in enumerate(runs):
        layers = _layer_labels(st)
        if "entropy" in st:
            for g in groups:
                rows = [np.asarray(v[g]) for v in st["entropy"].values() if g in v]
                if rows:
                    ax.plot(np.mean(rows, 0), ls=_LINESTYLES[r % 4], color=_GROUP_COLOURS.get(g), marker="o", ms=3,
                            label=f"{label}: {GROUP_LABEL.get(g, g)}")
        if r == 0:
            ax.axhline(np.log(st["meta"]["num_experts"]), color="k", lw=0.8, ls="--", label="uniform (max)")
        _layer_ticks(ax, layers, axis="x")
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("entropy (nats)")
    ax.set_title("Router entropy (mean over tokens and scales)", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    for r, (label, st) in enumerate(runs):
        for s, v in st["load_cv"].items():
            if "all" in v:
                ax.plot(v["all"], ls=_LINESTYLES[r % 4], marker="o", ms=3, label=f"{label}: {s}")
        _layer_ticks(ax, _layer_labels(st), axis="x")
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("CV of expert load")
    ax.set_title("Load imbalance (0 = balanced)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_similarity(matrices: Sequence[dict], path, title: str = "Token similarity between compression rates") -> Path:
    """Cosine-similarity matrices, each with its own colour range. Items: ``{"sim": [N, M], "title", "rows_label",
    "cols_label"}``."""
    from matplotlib.ticker import MaxNLocator

    n = len(matrices)
    if n == 0:
        raise ValueError("plot_similarity: no matrices given")
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 4.0), squeeze=False, constrained_layout=True)
    for ax, m in zip(axes[0], matrices):
        im = ax.imshow(np.asarray(m["sim"]), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(m.get("title", ""), fontsize=9)
        ax.set_ylabel(m.get("rows_label", "tokens (rate a)"))
        ax.set_xlabel(m.get("cols_label", "tokens (rate b)"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
    fig.suptitle(title)
    return _save(fig, path)


def plot_all(runs: Runs, out_dir, similarity: Optional[Sequence[dict]] = None) -> dict:
    """Every figure that applies into ``out_dir``; returns ``{name: path}``."""
    out = Path(out_dir)
    figs = {"usage_all": plot_usage_heatmaps(runs, out / "usage_all.png", "all")}
    for g in ("audio", "video"):
        if any(g in groups for _, st in runs for groups in st["usage"].values()):
            figs[f"usage_{g}"] = plot_usage_heatmaps(runs, out / f"usage_{g}.png", g)
    figs["modality_usage"] = plot_modality_usage(runs, out / "modality_usage.png")
    if any(st["jsd"] for _, st in runs):  # needs two or more scales
        figs["consistency"] = plot_consistency(runs, out / "consistency.png", "all")
    figs["entropy_balance"] = plot_entropy_and_balance(runs, out / "entropy_balance.png")
    if similarity:
        figs["similarity"] = plot_similarity(similarity, out / "similarity.png")
    return figs
