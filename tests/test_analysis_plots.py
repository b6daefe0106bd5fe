"""Figures and the Markdown report from statistics of a synthetic routing trace (one run and a comparison)."""
import numpy as np

from analysis import plots, report
from analysis import stats as S
from analysis.trace import ROLE_CODE, TraceReader, TraceWriter
from mome.scales import Scale

SCALES = [Scale("avsr", 4, 2), Scale("avsr", 4, 5), Scale("avsr", 16, 2), Scale("avsr", 16, 5)]
E, K, LAYERS = 6, 2, [0, 1, 2]


def _trace(path, seed, shared):
    """Random routing; ``shared`` makes every scale use the same per-layer expert preference."""
    rng = np.random.default_rng(seed)
    pref = rng.dirichlet(np.ones(E) * 0.5, size=(len(SCALES), len(LAYERS)))
    if shared:
        pref[:] = pref[0]
    with TraceWriter(path, scales=SCALES, layers=LAYERS, num_experts=E, top_k=K, utterances_per_shard=2) as w:
        for u in range(3):
            for s_id, s in enumerate(SCALES):
                roles = ["audio"] * (32 // s.audio_rate) + ["video"] * (10 // s.video_rate) + ["transcript"] * 4
                T = len(roles)
                logits = np.log(pref[s_id])[None] + rng.gumbel(size=(T, len(LAYERS), E))
                probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
                ids = np.argsort(-probs, -1)[..., :K]
                gates = np.take_along_axis(probs, ids, -1)
                w.add(f"u{u}", s, [ROLE_CODE[r] for r in roles], np.arange(T), ids, gates / gates.sum(-1, keepdims=True),
                      probs)
            w.end_batch()
    return TraceReader(path)


def test_plots_and_report_for_one_and_two_runs(tmp_path):
    a = S.compute_stats(_trace(tmp_path / "a", 0, shared=True), meta={"label": "shared"})
    b = S.compute_stats(_trace(tmp_path / "b", 1, shared=False), meta={"label": "per-scale"})
    assert a["summary"]["cross_scale_jsd"] < b["summary"]["cross_scale_jsd"]  # shared preference -> closer usage
    sim = S.cosine_similarity(np.random.default_rng(0).normal(size=(4, 8)), np.random.default_rng(1).normal(size=(10, 8)))
    sims = [{"sim": sim, "title": "audio 16 vs 4", "rows_label": "rate 16", "cols_label": "rate 4"}]
    for name, runs in (("one", [("shared", a)]), ("two", [("shared", a), ("per-scale", b)])):
        out = tmp_path / name
        figs = plots.plot_all(runs, out, similarity=sims)
        assert set(figs) == {"usage_all", "usage_audio", "usage_video", "modality_usage", "consistency",
                             "entropy_balance", "similarity"}
        for p in figs.values():
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        md = report.write_report(out, runs, figs, similarity=[{**S.similarity_summary(sim, 4, 1), "title": "x"}])
        text = md.read_text()
        for p in figs.values():
            assert f"]({p.name})" in text
        assert text.count("| top-k overlap, coarse vs pooled fine |") == 1
        assert ("| metric | shared | per-scale |" in text) == (name == "two")
