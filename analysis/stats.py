"""Statistics of expert routing: pure functions on arrays, and ``compute_stats`` that streams over a trace.

Definitions (``L`` layers, ``E`` routed experts, ``K`` = top-k):

* **usage** of expert ``e`` at layer ``l``: how often ``e`` is among a token's top-k, as a fraction of all top-k
  selections at that layer (each layer's row sums to 1). Split by scale and by modality group
  (``analysis.trace.MODALITY_GROUPS``: audio, video, text, all).
* **load CV**: coefficient of variation (population std / mean) of the per-expert selection counts of a layer;
  0 = perfectly balanced, ``sqrt(E/K - 1)`` at most when every token picks the same K experts.
* **JSD**: Jensen-Shannon divergence (base 2, in [0, 1]) between two usage distributions of one layer.
* **router entropy**: mean over tokens of the entropy (nats) of the router's full probability vector.
* **top-k overlap** of a coarse token with the fine tokens it pools (``analysis.trace.pooling_map``): for each
  (coarse, fine) pair ``|topk(c) ∩ topk(f)| / K``, averaged over the fine tokens with their overlap weights, then
  over coarse tokens. Chance level for independent uniform routing is ``K / E``.
* **top-1 agreement**: the same with ``[top1(c) == top1(f)]``; chance level ``1 / E`` for uniform routing.
* **independence baselines** (``*_baseline``): the overlap / agreement expected if the two scales picked experts
  independently with their own per-layer marginal usage: ``K * sum_e u_a(e) u_b(e)`` for top-k overlap (``u`` =
  usage) and ``sum_e t_a(e) t_b(e)`` for top-1 (``t`` = top-1 usage). Agreement above the baseline means the same
  *time span* is routed alike, not just that both scales favour the same experts overall.
  Transcript tokens are the same tokens at every scale and pair one to one (group ``transcript``); the
  ``all`` entry of a token-level statistic pools audio, video and transcript coarse tokens.

Every function returns plain Python / numpy values; ``compute_stats`` returns a JSON-serialisable dict.
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from analysis.trace import MODALITY_GROUPS, RoutingRecord, TraceError, TraceReader, pooling_map
from mome.metrics.load import coefficient_of_variation

TOKEN_LEVEL_GROUPS = ("audio", "video", "transcript")

# ----------------------------------------------------------------------------------------------------------------
# distributions


def normalize(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """Counts -> frequencies along ``axis`` (an all-zero row stays zero)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=axis, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of distributions along ``axis`` (renormalised; 0 log 0 = 0)."""
    p = normalize(p, axis)
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(axis=axis)


def kl_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1, base: float = 2.0) -> np.ndarray:
    p, q = normalize(p, axis), normalize(q, axis)
    ratio = np.divide(p, q, out=np.ones_like(p), where=(p > 0) & (q > 0))
    return (p * np.log(ratio)).sum(axis=axis) / np.log(base)


def js_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1, base: float = 2.0) -> np.ndarray:
    """Jensen-Shannon divergence between distributions (counts are normalised first); base 2 gives [0, 1]."""
    p, q = normalize(p, axis), normalize(q, axis)
    m = 0.5 * (p + q)
    return 0.5 * kl_divergence(p, m, axis, base) + 0.5 * kl_divergence(q, m, axis, base)


# ----------------------------------------------------------------------------------------------------------------
# per-token arrays


def expert_counts(topk_ids: np.ndarray, num_experts: int, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """[L, E] how often each expert is selected (or the sum of ``weights``, e.g. gates) over tokens and ranks.

    ``topk_ids`` is [T, L, K] with -1 for unused ranks (ignored).
    """
    T, L, K = topk_ids.shape
    layer = np.broadcast_to(np.arange(L)[None, :, None], topk_ids.shape)
    valid = topk_ids >= 0
    flat = layer[valid].astype(np.int64) * num_experts + topk_ids[valid].astype(np.int64)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[valid]
    return np.bincount(flat, weights=w, minlength=L * num_experts).reshape(L, num_experts).astype(np.float64)


def one_hot_topk(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, L, K] ids -> [T, L, E] boolean membership (ids of -1 are dropped)."""
    T, L, K = topk_ids.shape
    out = np.zeros((T, L, num_experts + 1), dtype=bool)
    ids = np.where(topk_ids >= 0, topk_ids, num_experts).astype(np.int64)
    np.put_along_axis(out, ids, True, axis=2)
    return out[..., :num_experts]


def topk_overlap(ids_a: np.ndarray, ids_b: np.ndarray, num_experts: int) -> np.ndarray:
    """[N, L] ``|topk(a) ∩ topk(b)| / K`` for paired tokens (both [N, L, K])."""
    if ids_a.shape != ids_b.shape:
        raise ValueError(f"topk_overlap: shapes differ, {ids_a.shape} vs {ids_b.shape}")
    inter = (one_hot_topk(ids_a, num_experts) & one_hot_topk(ids_b, num_experts)).sum(-1)
    return inter / ids_a.shape[-1]


def router_entropy(probs: np.ndarray) -> np.ndarray:
    """[T, L] entropy (nats) of each token's router distribution ([T, L, E])."""
    return entropy(np.asarray(probs, dtype=np.float64), axis=-1)


def pooled_agreement(
    ids_coarse: np.ndarray, ids_fine: np.ndarray, coarse_rate: int, fine_rate: int, num_experts: int
) -> Tuple[np.ndarray, np.ndarray, int]:
    """Token-level agreement of coarse tokens with the fine tokens they pool (one utterance, one modality).

    Returns ``(overlap_sum [L], top1_sum [L], n)``: sums over the ``n`` coarse tokens that pool at least one fine
    token of the overlap-weighted mean top-k overlap and top-1 agreement. Divide by ``n`` for the means.
    """
    L = ids_coarse.shape[1]
    c, f, w = pooling_map(coarse_rate, fine_rate, ids_coarse.shape[0], ids_fine.shape[0])
    if c.size == 0:
        return np.zeros(L), np.zeros(L), 0
    ov = topk_overlap(ids_coarse[c], ids_fine[f], num_experts)  # [P, L]
    same_top1 = (ids_coarse[c, :, 0] == ids_fine[f, :, 0]) & (ids_coarse[c, :, 0] >= 0)
    return (w[:, None] * ov).sum(0), (w[:, None] * same_top1).sum(0), int(np.unique(c).size)


# ----------------------------------------------------------------------------------------------------------------
# token similarity (paper Fig. 4)


def cosine_similarity(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """[N, M] cosine similarity between the rows of ``a`` [N, d] and ``b`` [M, d]."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cosine_similarity: need [N, d] and [M, d], got {a.shape} and {b.shape}")
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), eps)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), eps)
    return an @ bn.T


def span_mask(rows_rate: int, cols_rate: int, n_rows: int, n_cols: int) -> np.ndarray:
    """[N, M] True where row token (at ``rows_rate``) and column token (at ``cols_rate``) overlap in time."""
    mask = np.zeros((n_rows, n_cols), dtype=bool)
    r, c, _ = pooling_map(rows_rate, cols_rate, n_rows, n_cols)
    mask[r, c] = True
    return mask


def similarity_summary(sim: np.ndarray, rows_rate: int, cols_rate: int) -> dict:
    """How band-diagonal a similarity matrix between two rates is.

    ``band_mean`` / ``off_band_mean``: mean similarity of time-overlapping vs other token pairs; ``argmax_in_span``:
    fraction of rows whose most similar column overlaps the row's time span (1.0 = a perfect band).
    """
    n, m = sim.shape
    band = span_mask(rows_rate, cols_rate, n, m)
    rows = band.any(1)
    best = sim.argmax(1)
    return {
        "shape": [int(n), int(m)],
        "rows_rate": int(rows_rate),
        "cols_rate": int(cols_rate),
        "band_mean": float(sim[band].mean()) if band.any() else None,
        "off_band_mean": float(sim[~band].mean()) if (~band).any() else None,
        "argmax_in_span": float(band[np.arange(n), best][rows].mean()) if rows.any() else None,
    }


# ----------------------------------------------------------------------------------------------------------------
# streaming statistics over a trace


def pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


def _rate(rec: RoutingRecord, group: str) -> Optional[int]:
    return rec.rate(group) if group in ("audio", "video") else 1


class RoutingStatsAccumulator:
    """Accumulates per-(scale, group) counts and per-(scale pair, group) token agreement, record by record."""

    def __init__(self, scale_names: Sequence[str], num_layers: int, num_experts: int, top_k: int, has_probs: bool):
        self.scale_names = list(scale_names)
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.has_probs = has_probs
        self.groups = list(MODALITY_GROUPS) + [g for g in TOKEN_LEVEL_GROUPS if g not in MODALITY_GROUPS]
        shape = (len(self.scale_names), len(self.groups))
        self.tokens = np.zeros(shape, dtype=np.int64)
        self.counts = np.zeros(shape + (self.L, self.E))
        self.top1_counts = np.zeros(shape + (self.L, self.E))
        self.gate_sum = np.zeros(shape + (self.L, self.E))
        self.prob_sum = np.zeros(shape + (self.L, self.E))
        self.entropy_sum = np.zeros(shape + (self.L,))
        self.pairs = [pair_key(a, b) for a, b in itertools.combinations(self.scale_names, 2)]
        pshape = (len(self.pairs), len(TOKEN_LEVEL_GROUPS))
        self.pair_overlap = np.zeros(pshape + (self.L,))
        self.pair_top1 = np.zeros(pshape + (self.L,))
        self.pair_n = np.zeros(pshape, dtype=np.int64)

    def add_record(self, rec: RoutingRecord) -> None:
        s = self.scale_names.index(rec.scale.name)
        if rec.topk_ids.shape[1:] != (self.L, self.K):
            raise TraceError(f"record '{rec.utterance_id}' at {rec.scale}: topk_ids shape {rec.topk_ids.shape}")
        for g, group in enumerate(self.groups):
            m = rec.mask(group)
            n = int(m.sum())
            if n == 0:
                continue
            ids = rec.topk_ids[m]
            self.tokens[s, g] += n
            self.counts[s, g] += expert_counts(ids, self.E)
            self.top1_counts[s, g] += expert_counts(ids[:, :, :1], self.E)
            self.gate_sum[s, g] += expert_counts(ids, self.E, weights=rec.topk_gates[m])
            if self.has_probs and rec.probs is not None:
                p = rec.probs[m].astype(np.float64)
                self.prob_sum[s, g] += p.sum(0)
                self.entropy_sum[s, g] += router_entropy(p).sum(0)

    def add_utterance(self, records: Dict[str, RoutingRecord]) -> None:
        """All records of one utterance (``{scale_name: record}``): per-record counts and cross-scale agreement."""
        for rec in records.values():
            self.add_record(rec)
        for p, (a, b) in enumerate(itertools.combinations(self.scale_names, 2)):
            if a not in records or b not in records:
                continue
            ra, rb = records[a], records[b]
            for g, group in enumerate(TOKEN_LEVEL_GROUPS):
                rate_a, rate_b = _rate(ra, group), _rate(rb, group)
                if rate_a is None or rate_b is None:
                    continue
                ids_a, ids_b = ra.topk_ids[ra.mask(group)], rb.topk_ids[rb.mask(group)]
                if group == "transcript" and ids_a.shape[0] != ids_b.shape[0]:
                    raise TraceError(
                        f"utterance '{ra.utterance_id}': {ids_a.shape[0]} transcript tokens at {a} but "
                        f"{ids_b.shape[0]} at {b}; the transcript must be the same at every scale"
                    )
                # the coarser scale (larger rate) pools the finer one; equal rates pair one to one
                if rate_b > rate_a:
                    ids_a, ids_b, rate_a, rate_b = ids_b, ids_a, rate_b, rate_a
                ov, t1, n = pooled_agreement(ids_a, ids_b, rate_a, rate_b, self.E)
                self.pair_overlap[p, g] += ov
                self.pair_top1[p, g] += t1
                self.pair_n[p, g] += n

    def result(self, meta: Optional[dict] = None) -> dict:
        return _assemble(self, meta or {})


def _per_layer(x: np.ndarray) -> List:
    return np.round(np.asarray(x, dtype=np.float64), 6).tolist()


def _assemble(acc: RoutingStatsAccumulator, meta: dict) -> dict:
    out: dict = {
        "meta": {
            **meta,
            "num_layers": acc.L,
            "num_experts": acc.E,
            "top_k": acc.K,
            "scales": acc.scale_names,
            "groups": acc.groups,
            "has_probs": acc.has_probs,
            "chance": {"topk_overlap": acc.K / acc.E, "top1_agreement": 1.0 / acc.E, "uniform_load_cv": 0.0},
        },
        "tokens": {},
        "usage": {},
        "gate_share": {},
        "load_cv": {},
    }
    if acc.has_probs:
        out.update(mean_prob={}, entropy={})
    for s, name in enumerate(acc.scale_names):
        for key in ("tokens", "usage", "gate_share", "load_cv") + (("mean_prob", "entropy") if acc.has_probs else ()):
            out[key][name] = {}
        for g, group in enumerate(acc.groups):
            n = int(acc.tokens[s, g])
            if n == 0:
                continue
            out["tokens"][name][group] = n
            out["usage"][name][group] = _per_layer(normalize(acc.counts[s, g]))
            out["gate_share"][name][group] = _per_layer(normalize(acc.gate_sum[s, g]))
            out["load_cv"][name][group] = _per_layer(coefficient_of_variation(acc.counts[s, g]))
            if acc.has_probs:
                out["mean_prob"][name][group] = _per_layer(acc.prob_sum[s, g] / n)
                out["entropy"][name][group] = _per_layer(acc.entropy_sum[s, g] / n)

    # cross-scale divergence of usage distributions, per layer
    out["jsd"] = {}
    for a, b in itertools.combinations(range(len(acc.scale_names)), 2):
        key = pair_key(acc.scale_names[a], acc.scale_names[b])
        out["jsd"][key] = {
            group: _per_layer(js_divergence(acc.counts[a, g], acc.counts[b, g]))
            for g, group in enumerate(acc.groups)
            if acc.tokens[a, g] > 0 and acc.tokens[b, g] > 0
        }
    # token-level agreement, and what independent routing with the same marginals would give
    names = ("topk_overlap", "top1_agreement", "topk_overlap_baseline", "top1_agreement_baseline", "token_pairs")
    for name in names:
        out[name] = {}
    for p, (a, b) in enumerate(itertools.combinations(range(len(acc.scale_names)), 2)):
        res = {name: {} for name in names}
        base_ov, base_t1 = np.zeros((len(TOKEN_LEVEL_GROUPS), acc.L)), np.zeros((len(TOKEN_LEVEL_GROUPS), acc.L))
        for t, group in enumerate(TOKEN_LEVEL_GROUPS):
            n = int(acc.pair_n[p, t])
            if n == 0:
                continue
            g = acc.groups.index(group)
            base_ov[t] = acc.K * (normalize(acc.counts[a, g]) * normalize(acc.counts[b, g])).sum(-1)
            base_t1[t] = (normalize(acc.top1_counts[a, g]) * normalize(acc.top1_counts[b, g])).sum(-1)
            res["topk_overlap"][group] = _per_layer(acc.pair_overlap[p, t] / n)
            res["top1_agreement"][group] = _per_layer(acc.pair_top1[p, t] / n)
            res["topk_overlap_baseline"][group] = _per_layer(base_ov[t])
            res["top1_agreement_baseline"][group] = _per_layer(base_t1[t])
            res["token_pairs"][group] = n
        n_all = int(acc.pair_n[p].sum())
        if n_all:
            share = acc.pair_n[p][:, None] / n_all
            res["topk_overlap"]["all"] = _per_layer(acc.pair_overlap[p].sum(0) / n_all)
            res["top1_agreement"]["all"] = _per_layer(acc.pair_top1[p].sum(0) / n_all)
            res["topk_overlap_baseline"]["all"] = _per_layer((share * base_ov).sum(0))
            res["top1_agreement_baseline"]["all"] = _per_layer((share * base_t1).sum(0))
            res["token_pairs"]["all"] = n_all
        for name in names:
            out[name][acc.pairs[p]] = res[name]
    out["summary"] = summarize(out)
    return out


def _mean(values: Iterable[float]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return round(float(np.mean(v)), 6) if v else None


def summarize(stats: dict, group: str = "all") -> dict:
    """Headline numbers (means over layers, then over scales or scale pairs) for the report.

    ``cross_scale_jsd`` (same layer, different scales) vs ``cross_layer_jsd`` (same scale, different layers)
    checks the paper's claim: routing is consistent across rates within a layer but differs across layers.
    """
    usage = {s: np.asarray(g[group]) for s, g in stats["usage"].items() if group in g}
    cross_layer = []
    for u in usage.values():
        L = u.shape[0]
        cross_layer += [float(js_divergence(u[i], u[j])) for i, j in itertools.combinations(range(L), 2)]

    def pair_means(key):
        return {p: _mean(g[group]) for p, g in stats.get(key, {}).items() if group in g}

    per_scale = lambda key: {s: _mean(g[group]) for s, g in stats.get(key, {}).items() if group in g}  # noqa: E731
    jsd = pair_means("jsd")
    ov, t1 = pair_means("topk_overlap"), pair_means("top1_agreement")
    ov_base, t1_base = pair_means("topk_overlap_baseline"), pair_means("top1_agreement_baseline")
    return {
        "group": group,
        "cross_scale_jsd": _mean(jsd.values()),
        "cross_layer_jsd": _mean(cross_layer),
        "jsd_by_pair": jsd,
        "topk_overlap": _mean(ov.values()),
        "topk_overlap_by_pair": ov,
        "top1_agreement": _mean(t1.values()),
        "top1_agreement_by_pair": t1,
        "topk_overlap_baseline": _mean(ov_base.values()),
        "top1_agreement_baseline": _mean(t1_base.values()),
        "load_cv_by_scale": per_scale("load_cv"),
        "entropy_by_scale": per_scale("entropy") if "entropy" in stats else {},
        "max_entropy": round(float(np.log(stats["meta"]["num_experts"])), 6),
    }


def compute_stats(
    reader: TraceReader, scales: Optional[Sequence[str]] = None, progress: bool = False, meta: Optional[dict] = None
) -> dict:
    """Every statistic of the module docstring for a trace, as a JSON-serialisable dict.

    ``scales`` restricts the analysis (default: the scales that have records). Output keys: ``meta``, ``tokens``
    (scale -> group -> count), ``usage`` / ``gate_share`` / ``mean_prob`` (scale -> group -> [L][E]), ``load_cv`` /
    ``entropy`` (scale -> group -> [L]), ``jsd`` / ``topk_overlap`` / ``top1_agreement`` ("a|b" -> group -> [L]),
    ``topk_overlap_baseline`` / ``top1_agreement_baseline`` (same layout), ``token_pairs`` ("a|b" -> group ->
    coarse tokens compared) and ``summary``.
    """
    names = list(scales) if scales else [s.name for s in reader.recorded_scales]
    unknown = [n for n in names if n not in reader.scale_names]
    if unknown:
        raise TraceError(f"{reader.path}: scales {unknown} are not in the trace ({', '.join(reader.scale_names)})")
    acc = RoutingStatsAccumulator(names, len(reader.layers), reader.num_experts, reader.top_k, reader.has_probs)
    it = reader.utterances()
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(reader.utterance_ids), desc="routing stats", unit="utt")
    for _, recs in it:
        acc.add_utterance({k: v for k, v in recs.items() if k in names})
    m = {"layers": reader.layers, "trace": str(reader.path), "trace_meta": reader.meta, **(meta or {})}
    return acc.result(m)
