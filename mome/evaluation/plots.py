"""PNG plots of evaluation records (see ``mome.evaluation.tables`` for the record fields).

* ``plot_wer_vs_snr``: one panel per scale, one line per method (checkpoint), SNR on the x axis from clean to the
  noisiest; the judge (pretrained Whisper on the same audio) is a dashed grey reference line in every panel.
* ``plot_wer_vs_tokens``: one panel per modality (ASR / VSR / AVSR), WER against the LLM input tokens per second of
  media at each scale (log axis), one line per method, at one SNR; the judge line is drawn on the panels whose task
  hears audio.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # noqa: E402

from ..config import TASKS  # noqa: E402
from .tables import snr_columns, snr_sort_key  # noqa: E402

JUDGE_STYLE = dict(color="0.35", linestyle="--", linewidth=1.5)


def _methods(records: Sequence[Dict]) -> List[str]:
    out: List[str] = []
    for r in records:
        if not r.get("judge") and r["method"] not in out:
            out.append(r["method"])
    return out


def _grid(n: int):
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _figure(records: Sequence[Dict], panels: int):
    """A grid of ``panels`` axes, the methods to draw in each (in record order) and their colours."""
    fig, axes = _grid(panels)
    return fig, axes, _methods(records), plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(fig, path) -> Path:
    p = Path(path)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def plot_wer_vs_snr(records: Sequence[Dict], path: str | os.PathLike, title: str = "") -> Path:
    model_recs = [r for r in records if not r.get("judge")]
    judge_recs = [r for r in records if r.get("judge")]
    if not model_recs:
        raise ValueError("no model records to plot")
    snrs = snr_columns(records)
    xpos = {s: i for i, s in enumerate(snrs)}
    scales: List[str] = []
    for r in model_recs:
        if r["scale"] not in scales:
            scales.append(r["scale"])
    fig, axes, methods, colors = _figure(records, len(scales))
    for ax, scale in zip(axes, scales):
        for mi, m in enumerate(methods):
            pts = sorted(
                ((r["snr"], r["wer"]) for r in model_recs if r["method"] == m and r["scale"] == scale),
                key=lambda t: snr_sort_key(t[0]),
            )
            if pts:
                ax.plot([xpos[s] for s, _ in pts], [100 * w for _, w in pts], marker="o",
                        color=colors[mi % len(colors)], label=m)
        for jm in sorted({r["method"] for r in judge_recs}):
            pts = sorted(((r["snr"], r["wer"]) for r in judge_recs if r["method"] == jm), key=lambda t: snr_sort_key(t[0]))
            ax.plot([xpos[s] for s, _ in pts], [100 * w for _, w in pts], label=jm, **JUDGE_STYLE)
        ax.set_xticks(range(len(snrs)), [s if s == "clean" else f"{s}" for s in snrs])
        ax.set_xlabel("SNR (dB)")
        ax.set_ylabel("WER (%)")
        ax.set_title(scale)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_wer_vs_tokens(records: Sequence[Dict], path: str | os.PathLike, snr: Optional[str] = None,
                       title: str = "") -> Path:
    model_recs = [r for r in records if not r.get("judge")]
    if not model_recs:
        raise ValueError("no model records to plot")
    snrs = snr_columns(records)
    snr = snr if snr is not None else snrs[0]
    judge_recs = [r for r in records if r.get("judge") and r["snr"] == snr]
    model_recs = [r for r in model_recs if r["snr"] == snr]
    tasks = [t for t in TASKS if any(r["task"] == t for r in model_recs)]
    fig, axes, methods, colors = _figure(records, len(tasks))
    for ax, task in zip(axes, tasks):
        for mi, m in enumerate(methods):
            pts = sorted(
                (r["tokens_per_second"], r["wer"], r["scale"])
                for r in model_recs
                if r["method"] == m and r["task"] == task
            )
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [100 * p[1] for p in pts]
            ax.plot(xs, ys, marker="o", color=colors[mi % len(colors)], label=m)
            for x, y, name in pts:
                ax.annotate(name.split(":")[1], (x, 100 * y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        if task in ("asr", "avsr"):
            for jr in judge_recs:
                ax.axhline(100 * jr["wer"], label=jr["method"], **JUDGE_STYLE)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("LLM input tokens per second of media")
        ax.set_ylabel("WER (%)")
        ax.set_title(f"{task.upper()} ({'clean' if snr == 'clean' else snr + ' dB'})")
        ax.grid(alpha=0.3, which="both")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
