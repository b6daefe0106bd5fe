"""Result records and the tables made from them.

A **result record** is one (method, task, scale, SNR) cell, a flat dict:

``method`` (display label of the checkpoint, or the judge's), ``model_method`` (cfg.model.method, or ``whisper`` for the
judge), ``checkpoint``, ``judge`` (bool), ``task``, ``scale`` (``avsr:4x2``; ``full`` for the judge), ``audio_rate``,
``video_rate``, ``tokens_per_second`` (LLM input tokens per second of media at this scale; None for the judge),
``snr`` (``clean`` or the dB value as written in the config), ``snr_db`` (None for clean), ``noise_type``, ``split``,
``num_utterances``, ``wer``, ``cer`` (fractions), the raw counts (``word_errors``, ``ref_words``, ``substitutions``,
``deletions``, ``insertions``, ``char_errors``, ``ref_chars``) and ``hypotheses`` (the JSONL file, relative to the
output folder).

``results.json`` holds ``{"meta": ..., "results": [records], "cost": [cost rows]}``. The tables follow the papers'
layouts: the noise table (one row per method / scale, one column per SNR; ``wer.csv``, ``cer.csv``), the main table
(one row per method, one column per scale, at the first SNR; Markdown only) and the cost table (``cost.csv``).
Rates are shown in percent with one decimal.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import parse_snr

MISSING = "–"


def snr_sort_key(snr: str) -> Tuple[int, float]:
    """Clean first, then from the highest SNR to the lowest (the papers' column order)."""
    db = parse_snr(snr)
    return (0, 0.0) if db is None else (1, -db)


def snr_label(snr) -> str:
    """Canonical text of an SNR: ``clean`` or the number without a trailing ``.0`` (``5``, ``2.5``, ``-2.5``)."""
    db = parse_snr(snr)
    if db is None:
        return "clean"
    return f"{db:g}"


def _ordered_unique(values):
    seen, out = set(), []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def snr_columns(records: Sequence[Dict]) -> List[str]:
    return sorted(_ordered_unique(r["snr"] for r in records), key=snr_sort_key)


def row_keys(records: Sequence[Dict]) -> List[Tuple[str, str]]:
    """(method, scale) rows in first-seen order, with the judge rows last."""
    keys = _ordered_unique((r["method"], r["scale"]) for r in records if not r.get("judge"))
    keys += _ordered_unique((r["method"], r["scale"]) for r in records if r.get("judge"))
    return keys


def _fmt_pct(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    return f"{100.0 * x:.1f}"


def metric_table(records: Sequence[Dict], metric: str = "wer") -> Tuple[List[str], List[List[str]]]:
    """Header and rows: ``Method | Scale | <snr> ...`` with ``metric`` in percent; missing cells are ``–``."""
    cols = snr_columns(records)
    cell = {(r["method"], r["scale"], r["snr"]): r.get(metric) for r in records}
    header = ["Method", "Scale"] + [("clean" if c == "clean" else f"{c} dB") for c in cols]
    rows = []
    for method, scale in row_keys(records):
        rows.append([method, scale] + [_fmt_pct(cell.get((method, scale, c))) for c in cols])
    return header, rows


def scale_table(records: Sequence[Dict], snr: str, metric: str = "wer") -> Tuple[List[str], List[List[str]]]:
    """The papers' main-table layout at one SNR: one row per method, one column per scale (judge rows excluded)."""
    recs = [r for r in records if not r.get("judge") and r["snr"] == snr]
    scales = _ordered_unique(r["scale"] for r in recs)
    cell = {(r["method"], r["scale"]): r.get(metric) for r in recs}
    rows = [[m] + [_fmt_pct(cell.get((m, sc))) for sc in scales] for m in _ordered_unique(r["method"] for r in recs)]
    return ["Method"] + scales, rows


def cost_table(cost_rows: Sequence[Dict]) -> Tuple[List[str], List[List[str]]]:
    """Elastic-inference cost: one row per method / scale (see ``mome.evaluation.cost``)."""
    header = [
        "Method",
        "Scale",
        "LLM tokens (10 s)",
        "Tokens / s",
        "Prefill GFLOPs",
        "GFLOPs / new token",
        "Prefill ms",
        "ms / new token",
    ]

    def num(x, fmt):
        return MISSING if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    rows = []
    for c in cost_rows:
        rows.append(
            [
                c["method"],
                c["scale"],
                num(c.get("llm_tokens"), "d"),
                num(c.get("tokens_per_second"), ".2f"),
                num(None if c.get("prefill_flops") is None else c["prefill_flops"] / 1e9, ".2f"),
                num(None if c.get("decode_flops_per_token") is None else c["decode_flops_per_token"] / 1e9, ".3f"),
                num(None if c.get("prefill_ms") is None else c["prefill_ms"], ".1f"),
                num(None if c.get("decode_ms_per_token") is None else c["decode_ms_per_token"], ".1f"),
            ]
        )
    return header, rows


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(s):
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(header: Sequence[str], rows: Sequence[Sequence[str]], path: str | os.PathLike) -> Path:
    p = Path(path)
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return p


def write_results_json(path: str | os.PathLike, records: Sequence[Dict], cost: Sequence[Dict], meta: Dict) -> Path:
    p = Path(path)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": list(records), "cost": list(cost)}, indent=2))
    os.replace(tmp, p)
    return p


def write_tables(out_dir: str | os.PathLike, records: Sequence[Dict], cost: Sequence[Dict], title: str = "",
                 notes: Sequence[str] = ()) -> Dict[str, Path]:
    """Write ``wer.csv``, ``cer.csv``, ``cost.csv`` and ``results.md`` (all three tables, ``notes`` as lines under
    the title) into ``out_dir``."""
    out = Path(out_dir)
    paths: Dict[str, Path] = {}
    md = [f"# {title or 'Evaluation'}\n"] + ([" \n".join(notes) + "\n"] if notes else [])
    for metric, name in (("wer", "WER (%)"), ("cer", "CER (%)")):
        header, rows = metric_table(records, metric)
        paths[f"{metric}_csv"] = write_csv(header, rows, out / f"{metric}.csv")
        md += [f"## {name}, rows = method / scale, columns = SNR\n", to_markdown(header, rows)]
    snrs = snr_columns(records)
    if snrs:
        header, rows = scale_table(records, snrs[0])
        label = "clean" if snrs[0] == "clean" else f"{snrs[0]} dB"
        md += [f"## WER (%) at {label}, rows = method, columns = scale\n", to_markdown(header, rows)]
    if cost:
        header, rows = cost_table(cost)
        paths["cost_csv"] = write_csv(header, rows, out / "cost.csv")
        md += ["## Elastic-inference cost per scale\n", to_markdown(header, rows)]
    paths["markdown"] = out / "results.md"
    paths["markdown"].write_text("\n".join(md))
    return paths
