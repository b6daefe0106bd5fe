"""The comparison's tables, verdicts and results page, made from ``<out>/results.json`` alone.

``write_report(out)`` reads ``results.json`` (``mome.experiments.collect``) and writes ``table_clean.md|csv``,
``table_noise.md|csv``, the plots (``mome.experiments.plots``; the routing figures through ``analysis``) and
``RESULTS.md``. Nothing here trains or decodes: ``--report-only`` is this function.

**Seeds and spread.** A cell (method, scale, SNR) holds one WER per seed; it is shown as the mean, with
``±`` half the range when there are several seeds. Two cells are *distinguishable* when their means differ by more
than the **seed spread**: the larger of the two cells' ranges (max - min over seeds); a cell with a single seed
borrows the largest range measured over all multi-seed cells at the same scale and SNR. A difference within the
spread is reported as "not distinguishable", never as a win. With no repeated seed anywhere every difference
counts, and the page says so.

**Verdicts** (``verdicts``), each computed from the numbers, never written by hand:

1. *MoME <= MTSK at every pair, with fewer active parameters*: MoME against the best MTSK variant at each pair,
   and MoME's adapter-active parameter count against the smallest MTSK one;
2. *the gap is largest at the coarsest pair*: the gap to the best MTSK variant overall (the one with the extra
   seeds) at the coarsest pair against the gap at every other pair (the spread of a gap difference: the larger of
   the two pairs' spreads);
3. *AVSR beats audio-only under noise*: MoME's AVSR pairs against the audio-only model at the same audio rate, at
   every noisy SNR (clean shown, not judged);
4. *routing is more consistent across scales with the shared router*: the mean cross-scale JSD of expert usage of
   the trained MoME (over its seeds; their range is the spread) against the per-scale-router ablation.

Each is ``holds`` (better beyond the spread everywhere), ``holds in part`` (better where distinguishable, not
distinguishable elsewhere), ``not distinguishable``, ``does not hold`` (worse beyond the spread somewhere, or the
parameter condition fails) or ``not tested`` (results missing).
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HOLDS = "holds"
PARTLY = "holds in part"
NOT_DIST = "not distinguishable"
FAILS = "does not hold"
UNTESTED = "not tested"
MISSING = "–"

LOWER, HIGHER = "lower", "higher"


# ----------------------------------------------------------------------------------------------------------------
# cells and comparisons


@dataclass
class Cell:
    """The WER (fractions) of one (method, scale, SNR) over seeds."""

    values: List[float]
    seeds: List[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    @property
    def spread(self) -> float:
        return self.hi - self.lo


def pct(x: Optional[float], digits: int = 1) -> str:
    return MISSING if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def fmt_cell(c: Optional[Cell]) -> str:
    """``41.2`` (one seed) or ``41.2 ±1.5`` (mean ± half the range over seeds), in percent."""
    if c is None:
        return MISSING
    return pct(c.mean) if c.n == 1 else f"{pct(c.mean)} ±{100 * c.spread / 2:.1f}"


@dataclass
class Comparison:
    """``a`` against ``b`` (lower WER is better): ``outcome`` is ``lower`` / ``higher`` (a's mean beyond the seed
    spread) or ``not distinguishable``."""

    a: Cell
    b: Cell
    threshold: float
    measured: bool  # False: no seed spread available, every difference counted

    @property
    def diff(self) -> float:
        return self.a.mean - self.b.mean

    @property
    def outcome(self) -> str:
        if self.diff < -self.threshold:
            return LOWER
        if self.diff > self.threshold:
            return HIGHER
        return NOT_DIST

    def text(self) -> str:
        """``-3.8 points (seed spread 1.5): lower``."""
        spread = f"seed spread {100 * self.threshold:.1f}" if self.measured else "no seed spread measured"
        return f"{100 * self.diff:+.1f} points ({spread}): {self.outcome}"


def aggregate(records: Sequence[dict]) -> Dict[Tuple[str, str, str], Cell]:
    """``{(key, scale, snr): Cell}`` over seeds (records carry ``key``, ``seed``, ``scale``, ``snr``, ``wer``)."""
    out: Dict[Tuple[str, str, str], Cell] = {}
    for r in sorted(records, key=lambda r: r.get("seed", 0)):
        c = out.setdefault((r["key"], r["scale"], r["snr"]), Cell([], []))
        c.values.append(float(r["wer"]))
        c.seeds.append(int(r.get("seed", 0)))
    return out


def seed_spreads(cells: Dict[Tuple[str, str, str], Cell]) -> Dict[Tuple[str, str], float]:
    """``{(scale, snr): the largest range}`` over the cells with two or more seeds."""
    out: Dict[Tuple[str, str], float] = {}
    for (_, scale, snr), c in cells.items():
        if c.n > 1:
            out[(scale, snr)] = max(out.get((scale, snr), 0.0), c.spread)
    return out


def combine(outcomes: Sequence[str], good: str = LOWER) -> str:
    """One status from per-cell outcomes where ``good`` is what the claim predicts."""
    if not outcomes:
        return UNTESTED
    if any(o not in (good, NOT_DIST) for o in outcomes):
        return FAILS
    if all(o == good for o in outcomes):
        return HOLDS
    if all(o == NOT_DIST for o in outcomes):
        return NOT_DIST
    return PARTLY


def tally(outcomes: Sequence[str], names: Sequence[str], good: str = LOWER, bad: str = HIGHER,
          words: Optional[Dict[str, str]] = None) -> str:
    """``lower at (4,2), (4,5); not distinguishable at (16,2); higher at (16,5)`` (``words`` rephrases each
    outcome's lead-in, e.g. ``{"larger": "larger than at"}``)."""
    words = words or {}
    parts = []
    for o in (good, NOT_DIST, bad):
        at = [n for n, x in zip(names, outcomes) if x == o]
        if at:
            parts.append(f"{words.get(o, o + ' at')} {', '.join(at)}")
    return "; ".join(parts) or "no cells"


def pair_label(scale: str) -> str:
    """``avsr:4x2`` -> ``(4,2)``; other scales unchanged."""
    if scale.startswith("avsr:"):
        a, v = scale.split(":")[1].split("x")
        return f"({a},{v})"
    return scale


def snr_title(snr: str) -> str:
    return "clean" if snr == "clean" else f"{snr} dB"


# ----------------------------------------------------------------------------------------------------------------
# the results


@dataclass
class Verdict:
    claim: str
    status: str
    summary: str
    details: List[str] = field(default_factory=list)


class Results:
    """``results.json`` with the lookups the tables and verdicts need."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.spec = doc["spec"]
        self.ev = self.spec["evaluation"]
        self.claims = self.spec.get("claims") or {}
        self.methods = self.spec["methods"]
        self.labels = {m["key"]: m["label"] for m in self.methods}
        recs = doc.get("records", [])
        self.cells = aggregate([r for r in recs if r["kind"] in ("clean", "noise")])
        self.beam_cells = aggregate([r for r in recs if r["kind"] == "beam"])
        self.spreads = seed_spreads(self.cells)
        self.judge = {r["snr"]: r for r in doc.get("judge", [])}
        self.runs = doc.get("runs", [])
        self.params = {}
        for run in self.runs:
            if run.get("params") and run["key"] not in self.params:
                self.params[run["key"]] = run["params"]
        self.tps = {r["scale"]: r.get("tokens_per_second") for r in recs}

    def cell(self, key: str, scale: str, snr: str = "clean") -> Optional[Cell]:
        return self.cells.get((key, scale, snr))

    def compare(self, a: Cell, b: Cell, scales: Sequence[str], snr: str) -> Comparison:
        own = [c.spread for c in (a, b) if c.n > 1]
        pooled = [self.spreads[(s, snr)] for s in scales if (s, snr) in self.spreads]
        values = own + (pooled if (a.n < 2 or b.n < 2) else [])
        return Comparison(a, b, max(values) if values else 0.0, bool(values))

    def seeds_of(self, key: str) -> List[int]:
        return sorted({r["seed"] for r in self.runs if r["key"] == key})

    def best_mtsk(self) -> Optional[str]:
        """The MTSK variant the gap is measured to: the one that got the extra seeds, else the lowest mean clean WER
        over the pairs."""
        mtsk = [k for k in self.claims.get("mtsk") or [] if any(self.cell(k, p) for p in self.ev["pairs"])]
        extra = (self.doc.get("extra_seeds") or {}).get("best")
        if extra in mtsk:
            return extra
        scored = {k: _mean([self.cell(k, p).mean for p in self.ev["pairs"] if self.cell(k, p)]) for k in mtsk}
        return min(scored, key=scored.get) if scored else None


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# verdicts


def verdict_mome_vs_mtsk(R: Results) -> Verdict:
    claim = "MoME <= Llama-MTSK at every rate pair, with fewer active parameters"
    mome, mtsk = R.claims.get("mome"), R.claims.get("mtsk") or []
    outcomes, names, details = [], [], []
    for p in R.ev["pairs"]:
        a = R.cell(mome, p) if mome else None
        cands = [(k, R.cell(k, p)) for k in mtsk if R.cell(k, p)]
        if a is None or not cands:
            details.append(f"{pair_label(p)}: missing results")
            continue
        k, b = min(cands, key=lambda kc: kc[1].mean)
        c = R.compare(a, b, [p], "clean")
        outcomes.append(c.outcome)
        names.append(pair_label(p))
        details.append(f"{pair_label(p)}: MoME {fmt_cell(a)} vs {fmt_cell(b)} ({R.labels[k]}, the best MTSK there): "
                       f"{c.text()}")
    wer_status = combine(outcomes)
    summary = f"WER: MoME {tally(outcomes, names)} (against the best MTSK variant at each pair)"
    status = wer_status
    pm = R.params.get(mome)
    pt = [(k, R.params[k]) for k in mtsk if k in R.params]
    if pm and pt:
        k, smallest = min(pt, key=lambda kp: kp[1]["adapter_active"])
        ratio = pm["adapter_active"] / smallest["adapter_active"]
        fewer = pm["adapter_active"] < smallest["adapter_active"]
        details.append(f"active adapter parameters per scale: MoME {pm['adapter_active']:,} vs {R.labels[k]} "
                       f"{smallest['adapter_active']:,} ({ratio:.2f}x): {'fewer' if fewer else 'not fewer'}")
        summary += f"; active parameters {ratio:.2f}x MTSK's ({'fewer' if fewer else 'more, not fewer'})"
        if not fewer and status != UNTESTED:
            status = FAILS
    else:
        details.append("parameter counts missing")
    return Verdict(claim, status, summary, details)


def verdict_gap_coarsest(R: Results) -> Verdict:
    coarse = R.claims.get("coarsest")
    claim = f"the MoME-MTSK gap is largest at the coarsest pair {pair_label(coarse) if coarse else '?'}"
    mome, best = R.claims.get("mome"), R.best_mtsk()
    pairs = R.ev["pairs"]
    gaps: Dict[str, Tuple[float, float]] = {}
    for p in pairs:
        a, b = (R.cell(mome, p), R.cell(best, p)) if mome and best else (None, None)
        if a is not None and b is not None:
            c = R.compare(b, a, [p], "clean")
            gaps[p] = (c.diff, c.threshold)  # > 0: MoME better
    if not coarse or coarse not in gaps or len(gaps) < 2:
        return Verdict(claim, UNTESTED, "results missing", [])
    details = [f"gap (MTSK - MoME, WER points) to {R.labels[best]}: "
               + ", ".join(f"{pair_label(p)} {100 * g:+.1f}" for p, (g, _) in gaps.items())]
    outcomes, names = [], []
    for p, (g, thr) in gaps.items():
        if p == coarse:
            continue
        d, t = gaps[coarse][0] - g, max(gaps[coarse][1], thr)
        o = "larger" if d > t else "smaller" if d < -t else NOT_DIST
        outcomes.append(o)
        names.append(pair_label(p))
        details.append(f"at {pair_label(coarse)} vs {pair_label(p)}: {100 * d:+.1f} points (spread {100 * t:.1f}): "
                       f"{o}")
    largest = max(gaps, key=lambda p: gaps[p][0])
    status = combine(outcomes, good="larger")
    summary = (f"the gap is largest at {pair_label(largest)} ({100 * gaps[largest][0]:+.1f} points); at "
               f"{pair_label(coarse)} it is {100 * gaps[coarse][0]:+.1f}, "
               + tally(outcomes, names, good="larger", bad="smaller",
                       words={"larger": "larger than at", NOT_DIST: "not distinguishable from",
                              "smaller": "smaller than at"}))
    if gaps[coarse][0] <= 0:
        details.append(f"MoME is not better than {R.labels[best]} at {pair_label(coarse)} at all")
    return Verdict(claim, status, summary, details)


def verdict_av_vs_audio(R: Results) -> Verdict:
    claim = "AVSR beats audio-only under noise"
    ao, mome = R.claims.get("audio_only") or {}, R.claims.get("mome")
    outcomes, names, details = [], [], []
    for av, a in ao.get("pairs", []):
        for snr in ["clean"] + list(R.ev["snrs"]):
            x, y = R.cell(mome, av, snr), R.cell(ao.get("method"), a, snr)
            if x is None or y is None:
                details.append(f"{pair_label(av)} vs {a} at {snr_title(snr)}: missing results")
                continue
            c = R.compare(x, y, [av, a], snr)
            details.append(f"{snr_title(snr)}: MoME {pair_label(av)} {fmt_cell(x)} vs audio-only {a} {fmt_cell(y)}: "
                           f"{c.text()}" + (" (clean: shown, not judged)" if snr == "clean" else ""))
            if snr != "clean":
                outcomes.append(c.outcome)
                names.append(f"{pair_label(av)} {snr_title(snr)}")
    if not ao:
        return Verdict(claim, UNTESTED, "no audio-only model in the comparison (claims.audio_only)", details)
    summary = (f"audio-only: {R.labels.get(ao.get('method'), ao.get('method'))}; AVSR " + tally(outcomes, names))
    return Verdict(claim, combine(outcomes), summary, details)


def verdict_routing(R: Results) -> Verdict:
    claim = "routing is more consistent across scales with the shared router (JSD of expert usage)"
    entries = R.doc.get("routing") or []
    trained = [e for e in entries if e["role"] == "trained" and e["headline"].get("cross_scale_jsd") is not None]
    ablation = [e for e in entries if e["role"] == "ablation" and e["headline"].get("cross_scale_jsd") is not None]
    if not trained:
        return Verdict(claim, UNTESTED, "no routing trace of a trained MoME model (routing.method)", [])
    if not ablation:
        return Verdict(claim, UNTESTED, "no per-scale-router ablation in the comparison to hold the shared router "
                                        "against (routing.ablation); the routing table shows the shared router alone",
                       [])
    shared = Cell([e["headline"]["cross_scale_jsd"] for e in trained], [e["seed"] for e in trained])
    per_scale = Cell([e["headline"]["cross_scale_jsd"] for e in ablation], [e["seed"] for e in ablation])
    thr = max([c.spread for c in (shared, per_scale) if c.n > 1] or [0.0])
    c = Comparison(shared, per_scale, thr, shared.n > 1 or per_scale.n > 1)
    details = [f"cross-scale JSD (bits, mean over layers and scale pairs): shared {shared.mean:.4f}"
               + (f" ±{shared.spread / 2:.4f} over {shared.n} seeds" if shared.n > 1 else "")
               + f", per-scale router {per_scale.mean:.4f}: {c.diff:+.4f} bits (seed spread {thr:.4f}): "
               f"{c.outcome}"]
    for e in entries:
        h = e["headline"]
        lift = (h["topk_overlap"] - h["topk_overlap_baseline"]) if h.get("topk_overlap") is not None and \
            h.get("topk_overlap_baseline") is not None else None
        details.append(f"{e['label']}: cross-scale JSD {_f(h.get('cross_scale_jsd'))}, cross-layer JSD "
                       f"{_f(h.get('cross_layer_jsd'))}, top-k overlap {_f(h.get('topk_overlap'))} against "
                       f"{_f(h.get('topk_overlap_baseline'))} for independent routing (lift {_f(lift)})")
    status = {LOWER: HOLDS, HIGHER: FAILS, NOT_DIST: NOT_DIST}[c.outcome]
    summary = (f"cross-scale JSD {shared.mean:.4f} (shared) vs {per_scale.mean:.4f} (per-scale): "
               f"{'lower' if c.outcome == LOWER else 'higher' if c.outcome == HIGHER else NOT_DIST}"
               + ("" if c.measured else " (one seed each: no spread measured)"))
    initial = [e for e in entries if e["role"] == "initial" and e["headline"].get("cross_scale_jsd") is not None]
    if initial:  # how much of it is there before any training
        summary += f"; the shared router at step 0: {initial[0]['headline']['cross_scale_jsd']:.4f}"
    return Verdict(claim, status, summary, details)


def _f(x, digits: int = 4) -> str:
    return MISSING if x is None else f"{x:.{digits}f}"


def verdict_beam(R: Results) -> Optional[Verdict]:
    b = R.ev.get("beam")
    if not b or not R.beam_cells:
        return None
    key = b["method"]
    outcomes, names, details = [], [], []
    for p in R.ev["pairs"]:
        g, s = R.cell(key, p), R.beam_cells.get((key, p, "clean"))
        if g is None or s is None:
            continue
        seed0 = Cell([g.values[0]], [g.seeds[0]])  # the beam run is the first seed
        c = R.compare(s, seed0, [p], "clean")
        outcomes.append(c.outcome)
        names.append(pair_label(p))
        details.append(f"{pair_label(p)}: beam {b['num_beams']} {pct(s.mean)} vs greedy {pct(g.values[0])} (seed "
                       f"{g.seeds[0]}): {c.text()}")
    changes = [o for o in outcomes if o != NOT_DIST]
    summary = (f"beam search ({b['num_beams']} beams) on {R.labels.get(key, key)}: "
               + ("changes the table beyond the seed spread: " + tally(outcomes, names) if changes else
                  "does not change the table beyond the seed spread"))
    return Verdict("greedy vs beam search", "changes the table" if changes else "no change beyond the spread",
                   summary, details)


def verdicts(R: Results) -> List[Verdict]:
    return [verdict_mome_vs_mtsk(R), verdict_gap_coarsest(R), verdict_av_vs_audio(R), verdict_routing(R)]


# ----------------------------------------------------------------------------------------------------------------
# tables


def row_groups(R: Results) -> List[Tuple[str, List[str]]]:
    """``[(row label, [method keys])]`` in YAML order, methods sharing a ``row`` together."""
    out: List[Tuple[str, List[str]]] = []
    for m in R.methods:
        for row, keys in out:
            if row == m["row"]:
                keys.append(m["key"])
                break
        else:
            out.append((m["row"], [m["key"]]))
    return out


def _joined(values) -> str:
    vals = list(dict.fromkeys(values))
    return " / ".join(vals) if vals else MISSING


def clean_table(R: Results) -> Tuple[List[str], List[List[str]]]:
    """One row per table row: WER (%) at each pair, clean; seeds; adapter-active and trainable parameters."""
    pairs = R.ev["pairs"]
    header = ["Method"] + [pair_label(p) for p in pairs] + ["seeds", "active params (adapter)", "trainable params"]
    rows = []
    for row, keys in row_groups(R):
        cells = []
        for p in pairs:
            c = next((R.cell(k, p) for k in keys if R.cell(k, p)), None)
            cells.append(fmt_cell(c))
        if all(c == MISSING for c in cells):
            continue
        seeds = _joined(",".join(map(str, R.seeds_of(k))) for k in keys)
        active = _joined(f"{R.params[k]['adapter_active']:,}" for k in keys if k in R.params)
        trainable = _joined(f"{R.params[k]['totals']['trainable']:,}" for k in keys if k in R.params)
        rows.append([row] + cells + [seeds, active, trainable])
    j = R.judge.get("clean")
    if j:
        rows.append([f"{j['method']} (audio only, the same decode in every column)"] + [pct(j["wer"])] * len(pairs)
                    + ["–", "–", "–"])
    return header, rows


def noise_table(R: Results) -> Tuple[List[str], List[List[str]]]:
    """One row per (method, noise scale): WER (%) clean and at each SNR."""
    snrs = ["clean"] + list(R.ev["snrs"])
    header = ["Method", "Scale"] + [snr_title(s) for s in snrs]
    rows = []
    for m in R.methods:
        for scale in R.ev["noise_scales"]:
            cells = [fmt_cell(R.cell(m["key"], scale, s)) for s in snrs]
            if any(R.cell(m["key"], scale, s) for s in R.ev["snrs"]):
                rows.append([m["label"], pair_label(scale)] + cells)
    if R.judge:
        name = next(iter(R.judge.values()))["method"]
        rows.append([name, "full audio"] + [pct(R.judge[s]["wer"]) if s in R.judge else MISSING for s in snrs])
    return header, rows


def beam_table(R: Results) -> Tuple[List[str], List[List[str]]]:
    b = R.ev.get("beam") or {}
    key = b.get("method")
    header = ["Pair", "greedy (first seed)", f"beam {b.get('num_beams', '?')}", "beam - greedy (points)"]
    rows = []
    for p in R.ev["pairs"]:
        g, s = R.cell(key, p), R.beam_cells.get((key, p, "clean"))
        if g is None or s is None:
            continue
        rows.append([pair_label(p), pct(g.values[0]), pct(s.mean), f"{100 * (s.mean - g.values[0]):+.1f}"])
    return header, rows


def routing_table(R: Results) -> Tuple[List[str], List[List[str]]]:
    header = ["Run", "cross-scale JSD", "cross-layer JSD", "top-k overlap", "independent-routing baseline",
              "top-1 agreement", "router entropy", "load CV"]
    rows = []
    for e in R.doc.get("routing") or []:
        h = e["headline"]
        rows.append([e["label"], _f(h.get("cross_scale_jsd")), _f(h.get("cross_layer_jsd")), _f(h.get("topk_overlap")),
                     _f(h.get("topk_overlap_baseline")), _f(h.get("top1_agreement")), _f(h.get("entropy"), 3),
                     _f(h.get("load_cv"), 3)])
    return header, rows


def _sec(x) -> str:
    return MISSING if x is None else f"{x:.0f}"


def timing_table(R: Results) -> Tuple[List[str], List[List[str]]]:
    """Per run: steps, training utterances, epochs reached, training and evaluation wall time, the estimate."""
    est = {}
    for row in R.doc.get("plan") or []:
        rid = row["what"].split(" ")[0]
        est[(row["stage"], rid)] = row["seconds"]
    header = ["Run", "steps", "train utts", "train s", "est. train s", "eval s", "est. eval s", "decodes",
              "utt/s"]
    rows = []
    for run in R.runs:
        t, ev = run.get("train") or {}, run.get("eval") or {}
        eval_s = sum(v["seconds"] for v in ev.values() if v and v.get("seconds") is not None and v["kind"] != "beam")
        decodes = sum(v["decodes"] for v in ev.values() if v and v["kind"] != "beam")
        rows.append([run["run_id"], str(t.get("steps", MISSING)), str(t.get("samples", MISSING)), _sec(t.get("seconds")),
                     _sec(est.get(("train", run["run_id"]))), _sec(eval_s if ev else None),
                     _sec(est.get(("eval", run["run_id"]))), str(decodes) if ev else MISSING,
                     f"{decodes / eval_s:.2f}" if ev and eval_s else MISSING])
    return header, rows


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    from ..evaluation.tables import to_markdown as md

    return md(header, rows)


def write_csv(header, rows, path: Path) -> Path:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# the page


def total_seconds(doc: dict) -> Dict[str, float]:
    """Measured wall seconds per stage kind (training, evaluation, judge, routing), summed over calls."""
    out = {"train": 0.0, "eval": 0.0, "beam": 0.0, "judge": 0.0, "routing": 0.0}
    for run in doc.get("runs", []):
        out["train"] += (run.get("train") or {}).get("seconds") or 0.0
        for kind, v in (run.get("eval") or {}).items():
            out["beam" if kind == "beam" else "eval"] += v.get("seconds") or 0.0
    out["judge"] = (doc.get("judge_timing") or {}).get("seconds") or 0.0
    out["routing"] = sum(e.get("seconds") or 0.0 for e in doc.get("routing") or [])
    return out


def _decoding(prot: dict) -> str:
    n = (prot.get("decoding") or {}).get("num_beams")
    return "greedy decoding" if n == 1 else f"beam search ({n} beams)" if n else "decoding ?"


def _header_lines(doc: dict, R: Results, command: Optional[str]) -> List[str]:
    meta, spec, prot = doc["meta"], doc["spec"], doc.get("protocol") or {}
    mach, git = meta.get("machine") or {}, meta.get("git") or {}
    secs = total_seconds(doc)
    est = (doc.get("plan") or [{}])[-1].get("total_minutes") if doc.get("plan") else None
    budget = next((r["budget"] for r in R.runs), {})
    seeds = "; ".join(f"{m['label']}: {','.join(map(str, R.seeds_of(m['key']))) or MISSING}" for m in R.methods)
    utts = ", ".join(map(str, prot.get("utterances") or [])) or MISSING
    lines = [
        f"- **Date**: {meta.get('created')}" + (f" (page redrawn {datetime.datetime.now().isoformat(timespec='seconds')}"
                                                 f" by `{command}`)" if command else ""),
        f"- **Command**: `{meta.get('command')}`" + "".join(f"; earlier: `{h['command']}` ({h.get('created')})"
                                                            for h in meta.get("history") or []),
        f"- **Machine**: {mach.get('cpu')}, {mach.get('cores')} cores ({mach.get('torch_threads')} torch threads), "
        f"{mach.get('memory_gib')} GiB, {mach.get('gpu') or 'no GPU'}; torch {mach.get('torch')}, Python "
        f"{mach.get('python')}",
        f"- **Code**: commit `{git.get('commit', '?')}` on `{git.get('branch', '?')}`"
        + (" (uncommitted changes)" if git.get("dirty") else ""),
        f"- **Config**: `{spec.get('config')}` over the recipe `{spec.get('recipe')}`"
        + (" with its `quick` section (tiny random backbones)" if spec.get("quick") else ""),
        f"- **Budget per method**: {budget.get('max_steps')} optimizer steps (train.max_steps), at most "
        f"{budget.get('max_minutes')} min of training (train.max_minutes); same data, recipe and evaluation for all",
        f"- **Seeds**: {seeds}",
        f"- **Evaluation**: {prot.get('split')} split, {utts} utterances per cell (eval.max_utterances), "
        f"{_decoding(prot)}, noise {prot.get('noise')}; "
        f"WER normalisation: {prot.get('normalisation')}",
        f"- **Wall time** (measured, summed over calls): training {secs['train'] / 60:.1f} min, evaluation "
        f"{secs['eval'] / 60:.1f} min, beam {secs['beam'] / 60:.1f} min, judge {secs['judge'] / 60:.1f} min, "
        f"routing {secs['routing'] / 60:.1f} min; total {sum(secs.values()) / 60:.1f} min"
        + (f" (`--plan` estimate for the real backbones: {est} min)" if est is not None else ""),
    ]
    return lines


def _training_notes(R: Results) -> List[str]:
    notes = []
    clean_only = [r for r in R.runs if r.get("train", {}).get("epoch") is not None
                  and int(r["train"]["epoch"]) < int(r.get("clean_epochs", 0))]
    if clean_only and len(clean_only) == len(R.runs):
        notes.append(f"Every run ended inside its first {R.runs[0]['clean_epochs']} epoch(s), the recipe's clean-first "
                     "phase (data.transforms.clean_epochs): the models were trained on clean audio and meet babble only "
                     "at test time.")
    elif clean_only:
        notes.append("Runs trained on clean audio only (inside data.transforms.clean_epochs): "
                     + ", ".join(r["run_id"] for r in clean_only) + ".")
    short = [r["run_id"] for r in R.runs if (r.get("train") or {}).get("time_up")]
    if short:
        notes.append("Stopped by the time budget (train.max_minutes) before train.max_steps: " + ", ".join(short)
                     + "; they saw fewer utterances than the others.")
    return notes


def page(doc: dict, figures: Dict[str, str], command: Optional[str] = None) -> str:
    R = Results(doc)
    spec = doc["spec"]
    vs = verdicts(R)
    beam = verdict_beam(R)
    lines = ["# MoME against Llama-MTSK and Llama-AVSR on the embedded synthetic corpus", ""]
    if spec.get("quick"):
        lines += ["> **Quick run**: tiny random backbones and a few steps per method. It checks that the pipeline runs "
                  "end to end; its numbers say nothing about the methods.", ""]
    lines += _header_lines(doc, R, command) + [""]
    if not R.spreads:
        lines += ["> No cell has two seeds: every difference is counted, none is checked against seed noise.", ""]
    lines += ["## The paper's claims, here", ""]
    for v in vs:
        lines += [f"- **{v.claim}**: **{v.status}**. {v.summary}."] + [f"  - {d}" for d in v.details]
    if beam:
        lines += [f"- **{beam.claim}**: {beam.summary}."] + [f"  - {d}" for d in beam.details]
    lines += [""] + [f"*{n}*" for n in _training_notes(R)] + [""]
    ao = (spec.get("claims") or {}).get("audio_only") or {}
    if ao:
        lines += [f"*The audio-only row is a separate model, {R.labels.get(ao.get('method'), ao.get('method'))}: the "
                  "same MoME trained on ASR alone with the same budget, compared at the same audio rate "
                  f"({'; '.join(f'{pair_label(a)} with {b}' for a, b in ao.get('pairs', []))}).*", ""]
    h, rows = clean_table(R)
    lines += ["## WER (%) per rate pair, clean", "",
              "Mean over seeds, ± half the range between seeds. Active parameters: the adapter inside the LLM that "
              "decoding one scale uses (MoME: router + top-k and shared experts; LoRA: the adapters of that scale), "
              "as in the paper; trainable: everything trained (adapters, projectors, video front end, markers).", "",
              to_markdown(h, rows)]
    h, rows = noise_table(R)
    lines += [f"## WER (%) under babble noise", "", to_markdown(h, rows)]
    if beam:
        h, rows = beam_table(R)
        lines += ["## Greedy against beam search", "", to_markdown(h, rows)]
    h, rows = routing_table(R)
    if rows:
        lines += ["## Routing consistency", "",
                  "Teacher-forced over the first test utterances, clean. JSD (bits) between expert-usage distributions "
                  "of two scales at the same layer (cross-scale) or of two layers at the same scale (cross-layer); top-k "
                  "overlap of a coarse token with the fine tokens it pools, against what independent routing with the "
                  "same usage gives. `analysis/` computes all of them (routing/report.md).", "", to_markdown(h, rows)]
    refs = doc.get("reference_params") or []
    if refs:
        lines += ["## The same methods on the paper's LLM (parameter counts only)", "",
                  to_markdown(["config", "method", "LLM", "active params (adapter)"],
                              [[r["config"], r["method"], r["llm"], f"{r['adapter_active']:,}"] for r in refs])]
    h, rows = timing_table(R)
    jt = doc.get("judge_timing") or {}
    evals = [v for run in R.runs for k, v in (run.get("eval") or {}).items() if k != "beam" and v.get("seconds")]
    overall = (f" Over all runs: {sum(v['decodes'] for v in evals)} decodes in "
               f"{sum(v['seconds'] for v in evals) / 60:.1f} min, "
               f"{sum(v['decodes'] for v in evals) / sum(v['seconds'] for v in evals):.2f} utterances per second."
               if evals else "")
    lines += ["## Wall time and decoding throughput", "",
              "Training and evaluation seconds of each run as measured (the call that finished it), beside the "
              "estimate of `--plan` (mome/experiments/estimate.py). Decodes: utterances x scales x SNRs; utt/s "
              "includes model loading." + overall + " Decoding is batched (eval.batch_size); each batch is loaded and "
              "noised once per SNR and decoded at every scale of the model (mome.evaluation.decode). The frozen "
              "Whisper encoder runs again per scale and per model: it is about 1 % of the cost "
              "(benchmarks/RESULTS.md), so its outputs are not cached across methods.", "", to_markdown(h, rows)]
    if jt:
        lines += [f"Judge: {jt.get('decodes')} decodes in {jt.get('seconds')} s ({jt.get('utterances_per_second')} "
                  "utt/s).", ""]
    lines += ["## Figures", ""]
    for name, rel in figures.items():
        lines += [f"![{name}]({rel})", ""]
    lines += ["Regenerate this page, the tables and the figures from `results.json` without training: "
              f"`python -m mome.experiments.compare --out {spec.get('out', '<this folder>')} --report-only`.", ""]
    return "\n".join(lines)


def write_report(out: str | os.PathLike, command: Optional[str] = None) -> Dict[str, Path]:
    """Tables, figures and ``RESULTS.md`` in ``out`` from ``out/results.json``."""
    from . import plots

    out = Path(out)
    src = out / "results.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no results; run the comparison first (without --report-only)")
    doc = json.loads(src.read_text())
    R = Results(doc)
    paths: Dict[str, Path] = {}
    for name, fn in (("clean", clean_table), ("noise", noise_table)):
        h, rows = fn(R)
        paths[f"table_{name}_csv"] = write_csv(h, rows, out / f"table_{name}.csv")
        paths[f"table_{name}_md"] = out / f"table_{name}.md"
        paths[f"table_{name}_md"].write_text(to_markdown(h, rows))
    figures = {}
    if R.cells:
        figures["WER vs tokens per second"] = plots.plot_wer_vs_scale(R, out / "wer_vs_scale.png")
        if any(snr != "clean" for _, _, snr in R.cells):
            figures["WER vs SNR"] = plots.plot_wer_vs_snr(R, out / "wer_vs_snr.png")
    routing = doc.get("routing") or []
    if routing:
        figures["routing divergence"] = plots.plot_routing_divergence(routing, out / "routing_jsd.png")
        figures.update(plots.routing_figures(routing, out))
    paths.update({f"fig_{k}": v for k, v in figures.items()})
    rel = {k: os.path.relpath(v, out) for k, v in figures.items()}
    paths["page"] = out / "RESULTS.md"
    paths["page"].write_text(page(doc, rel, command))
    return paths
