"""The training curves of a run (loss, validation WER, reading gap, gradient and token norms), drawn from its
``metrics.jsonl`` into ``loss_curve.png``."""
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


def _percent(v) -> float:
    """A fraction as a percentage to plot; NaN (a gap in the line) when missing. 0 stays 0: a perfect WER is a point."""
    f = _num(v)
    return float("nan") if f is None else 100 * f


def _series(records, key, name):
    return [_num(r.get(key, {}).get(name)) for r in records]


def plot_loss_curve(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """The run's training curves in one PNG; returns its path. Panels: training loss (total and per scale) and
    validation loss against the step; when validated: greedy WER per scale against the step and against training
    wall seconds; the reading gap per scale (CE with another utterance's media minus CE with its own) and the
    attention share on A/V tokens; gradient norms per parameter group; token norms (audio, video, text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not train:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no training records to plot")
    wer_val = [r for r in val if "wer" in r]
    gap_val = [r for r in val if "reading_gap" in r]
    grads = [r for r in train if "grad_norm_group" in r]
    norms = [r for r in val if "token_norm" in r]
    panels = ["loss"] + (["wer_step", "wer_wall"] if wer_val else []) + (["gap"] if gap_val else []) \
        + (["grads"] if grads else []) + (["norms"] if norms else [])
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.3 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for ax in flat[len(panels):]:
        ax.axis("off")
    ax = dict(zip(panels, flat))

    a = ax["loss"]
    steps = [r["step"] for r in train]
    a.plot(steps, [_num(r.get("loss")) for r in train], color="black", lw=1.5, label="train loss (total)")
    scale_names = sorted({k for r in train for k in r.get("ce", {})})
    for name in scale_names:
        a.plot(steps, _series(train, "ce", name), lw=0.8, alpha=0.7, label=f"train CE {name}")
    if val:
        a.plot([r["step"] for r in val], [_num(r.get("loss")) for r in val], "o-", color="tab:red", lw=1.5,
               label="val loss")
    a.set_xlabel("optimizer step")
    a.set_ylabel("loss (nats per token)")
    a.set_yscale("log")
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=7)
    a.set_title(f"{run_dir.name}: loss")
    if wer_val:
        names = sorted({k for r in wer_val for k in r["wer"]})
        for key, xs, xlabel, title in (
                ("wer_step", [r["step"] for r in wer_val], "optimizer step", "validation WER per scale"),
                ("wer_wall", [_num(r.get("train_wall_s")) for r in wer_val],
                 "training wall seconds (validation excluded)", "validation WER against training time")):
            a = ax[key]
            for name in names:
                a.plot(xs, [_percent(r["wer"].get(name)) for r in wer_val], "o-", lw=1,
                       label=name)
            a.set_xlabel(xlabel)
            a.set_ylabel(f"greedy WER, {wer_val[-1].get('wer_samples', '?')} val utterances (%)")
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
            a.set_title(title)
    if gap_val:
        a = ax["gap"]
        xs = [r["step"] for r in gap_val]
        for name in sorted({k for r in gap_val for k in r["reading_gap"]}):
            a.plot(xs, _series(gap_val, "reading_gap", name), "o-", lw=1, label=f"gap {name}")
        a.axhline(0, color="grey", lw=0.8)
        a.set_xlabel("optimizer step")
        a.set_ylabel("CE(other's media) - CE(own media), nats/token")
        a.grid(alpha=0.3)
        share = [r for r in gap_val if "attn_av_share" in r]
        if share:
            a2 = a.twinx()
            for name in sorted({k for r in share for k in r["attn_av_share"]}):
                a2.plot([r["step"] for r in share], [100 * (v or 0) for v in _series(share, "attn_av_share", name)],
                        "x:", lw=0.8, alpha=0.7, label=f"attn on A/V {name}")
            a2.set_ylabel("attention of transcript positions on A/V tokens (%)")
            a2.legend(fontsize=6, loc="lower right")
        a.legend(fontsize=7, loc="upper left")
        a.set_title("reading gap (0 = the media are ignored)")
    if grads:
        a = ax["grads"]
        xs = [r["step"] for r in grads]
        for name in sorted({k for r in grads for k in r["grad_norm_group"]}):
            a.plot(xs, _series(grads, "grad_norm_group", name), lw=1, label=name)
        a.set_yscale("log")
        a.set_xlabel("optimizer step")
        a.set_ylabel("gradient L2 norm before clipping")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
        a.set_title("gradient norm per parameter group")
    if norms:
        a = ax["norms"]
        xs = [r["step"] for r in norms]
        for name in ("audio", "video", "text"):
            a.plot(xs, _series(norms, "token_norm", name), "o-", lw=1, label=f"{name} tokens")
        a.set_xlabel("optimizer step")
        a.set_ylabel("mean L2 norm of LLM input tokens")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
        a.set_title("A/V token norm vs text embedding norm")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
