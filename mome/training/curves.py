"""The loss curve of a run, drawn from its ``metrics.jsonl`` into ``loss_curve.png``."""
from __future__ import annotations

import math
import os
from pathlib import Path

from mome.training.logging import read_metrics


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def plot_loss_curve(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Training loss (total and per scale) and validation loss/WER against the step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not train:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no training records to plot")
    has_wer = any("wer" in r for r in val)
    fig, axes = plt.subplots(1, 2 if has_wer else 1, figsize=(12 if has_wer else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in train]
    ax.plot(steps, [_num(r.get("loss")) for r in train], color="black", lw=1.5, label="train loss (total)")
    scale_names = sorted({k for r in train for k in r.get("ce", {})})
    for name in scale_names:
        ax.plot(steps, [_num(r.get("ce", {}).get(name)) for r in train], lw=0.8, alpha=0.7, label=f"train CE {name}")
    if val:
        ax.plot([r["step"] for r in val], [_num(r.get("loss")) for r in val], "o-", color="tab:red", lw=1.5,
                label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"{run_dir.name}: loss")
    if has_wer:
        ax2 = axes[0][1]
        wer_val = [r for r in val if "wer" in r]
        for name in sorted({k for r in wer_val for k in r["wer"]}):
            ax2.plot([r["step"] for r in wer_val], [100 * (_num(r["wer"].get(name)) or float("nan")) for r in wer_val],
                     "o-", lw=1, label=name)
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel("greedy WER on validation samples (%)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
        ax2.set_title("validation WER")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss_curve.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
