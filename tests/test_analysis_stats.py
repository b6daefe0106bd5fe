"""Routing-trace format and statistics on hand-built traces with known answers."""
import json
import math

import numpy as np
import pytest

from analysis import stats as S
from analysis.trace import ROLE_CODE, RoutingRecord, TraceError, TraceReader, TraceWriter, pooling_map
from mome.scales import Scale

SCALES = [Scale("avsr", 4, 2), Scale("avsr", 4, 5), Scale("avsr", 16, 2), Scale("avsr", 16, 5)]
E, K, L = 4, 2, 2


# ----------------------------------------------------------------------------------------------------------------
# pure functions


def test_js_divergence_known_values():
    assert S.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert S.js_divergence([0.3, 0.7], [3, 7]) == pytest.approx(0.0)  # counts are normalised
    # [.5,.5] vs [1,0]: m = [.75,.25]; 0.5*(0.5*log2(2/3) + 0.5*log2(2)) + 0.5*log2(4/3)
    expected = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(2.0)) + 0.5 * math.log2(1 / 0.75)
    assert S.js_divergence([0.5, 0.5], [1, 0]) == pytest.approx(expected)
    assert expected == pytest.approx(0.311278, abs=1e-6)
    # row-wise over a layer axis
    got = S.js_divergence(np.array([[1, 0], [1, 1]]), np.array([[0, 1], [1, 1]]))
    np.testing.assert_allclose(got, [1.0, 0.0], atol=1e-12)


def test_cv_and_entropy_known_values():
    assert S.coefficient_of_variation([2, 2, 2, 2]) == pytest.approx(0.0)
    assert S.coefficient_of_variation([4, 0, 0, 0]) == pytest.approx(math.sqrt(3))
    assert S.coefficient_of_variation([0, 0]) == 0.0
    assert S.entropy([0.25] * 4) == pytest.approx(math.log(4))
    assert S.entropy([1, 0, 0, 0]) == pytest.approx(0.0)
    assert S.entropy([1, 1]) == pytest.approx(math.log(2))


def test_expert_counts_ignores_unused_ranks_and_weights_gates():
    ids = np.array([[[0, 1], [2, -1]], [[0, 3], [2, 1]]])  # [T=2, L=2, K=2]
    gates = np.array([[[0.7, 0.3], [1.0, 0.0]], [[0.6, 0.4], [0.5, 0.5]]])
    np.testing.assert_array_equal(S.expert_counts(ids, 4), [[2, 1, 0, 1], [0, 1, 2, 0]])
    np.testing.assert_allclose(S.expert_counts(ids, 4, gates), [[1.3, 0.3, 0, 0.4], [0, 0.5, 1.5, 0]])


def test_pooling_map_divisible_and_overlapping():
    c, f, w = pooling_map(16, 4, 2, 8)
    assert c.tolist() == [0] * 4 + [1] * 4 and f.tolist() == list(range(8))
    np.testing.assert_allclose(w, 0.25)
    # rates 5 and 2: coarse 0 covers frames [0,5) -> fine 0, 1 fully and half of fine 2
    c, f, w = pooling_map(5, 2, 2, 5)
    assert list(zip(c.tolist(), f.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (1, 4)]
    np.testing.assert_allclose(w, [0.4, 0.4, 0.2, 0.2, 0.4, 0.4])
    # fewer fine tokens than the span needs: weights renormalise over the existing ones
    c, f, w = pooling_map(5, 2, 2, 4)
    assert f[c == 1].tolist() == [2, 3]
    np.testing.assert_allclose(w[c == 1], [1 / 3, 2 / 3])
    # equal rates pair one to one; a coarse token beyond the fine sequence gets no entry
    c, f, w = pooling_map(4, 4, 3, 2)
    assert c.tolist() == [0, 1] and f.tolist() == [0, 1] and w.tolist() == [1.0, 1.0]


def test_pooled_agreement_known_values():
    coarse = np.array([[[0, 1]]])  # one coarse token, one layer
    fine = np.array([[[0, 1]], [[0, 2]], [[2, 3]], [[1, 0]]])
    ov, t1, n = S.pooled_agreement(coarse, fine, 16, 4, num_experts=4)
    assert n == 1
    assert ov[0] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert t1[0] == pytest.approx(0.5)  # fine top-1s 0, 0, 2, 1 vs coarse top-1 0


def test_cosine_similarity_and_band_summary():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [0.0, 1.0]])
    sim = S.cosine_similarity(a, b)
    np.testing.assert_allclose(sim, [[1, 1 / math.sqrt(2), 0, 0], [0, 1 / math.sqrt(2), 1, 1]])
    summ = S.similarity_summary(sim, rows_rate=2, cols_rate=1)  # row i overlaps columns 2i, 2i+1
    assert summ["argmax_in_span"] == 1.0
    assert summ["band_mean"] == pytest.approx((1 + 1 / math.sqrt(2) + 1 + 1) / 4)
    assert summ["off_band_mean"] == pytest.approx((0 + 0 + 0 + 1 / math.sqrt(2)) / 4)


# ----------------------------------------------------------------------------------------------------------------
# trace round trip


def _record(utt, scale, ids_fn, n_audio, n_video, n_text=3, probs_fn=None):
    """Sequence [bnd audio bnd bnd video bnd instr instr transcript*n_text]; ids_fn(role, i) -> [L, K] ids."""
    roles = (
        ["boundary"] + ["audio"] * n_audio + ["boundary"] * 2 + ["video"] * n_video + ["boundary"]
        + ["instruction"] * 2 + ["transcript"] * n_text
    )
    counter = {}
    ids, probs = [], []
    for r in roles:
        i = counter.get(r, 0)
        counter[r] = i + 1
        ids.append(ids_fn(r, i))
        probs.append(probs_fn(r, i) if probs_fn else np.full((L, E), 1.0 / E))
    ids = np.array(ids)
    gates = np.where(ids >= 0, 1.0 / K, 0.0)
    return RoutingRecord(utt, scale, np.array([ROLE_CODE[r] for r in roles], np.uint8),
                         np.arange(len(roles)) + 1, ids, gates, np.array(probs))


def test_trace_round_trip_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    written = []
    with TraceWriter(tmp_path / "t", scales=SCALES, layers=[3, 7], num_experts=E, top_k=K,
                     utterances_per_shard=2, meta={"split": "test"}) as w:
        for u in range(5):
            for s in (SCALES[0], SCALES[3]):
                n_a, n_v = 16 // s.audio_rate, 10 // s.video_rate
                rec = _record(f"utt{u}", s, lambda r, i: rng.permutation(E)[:K].reshape(1, K).repeat(L, 0), n_a, n_v,
                              probs_fn=lambda r, i: rng.dirichlet(np.ones(E), size=L))
                w.add_record(rec)
                written.append(rec)
            w.end_batch()
    rd = TraceReader(tmp_path / "t")
    assert len(list(rd.shards())) == 3 and rd.num_records == 10 and rd.layers == [3, 7]
    assert rd.utterance_ids == [f"utt{u}" for u in range(5)] and rd.meta == {"split": "test"}
    assert [s.name for s in rd.recorded_scales] == ["avsr:4x2", "avsr:16x5"]
    back = list(rd.records())
    assert len(back) == len(written)
    for a, b in zip(written, back):
        assert (a.utterance_id, a.scale) == (b.utterance_id, b.scale)
        np.testing.assert_array_equal(a.roles, b.roles)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_gates, b.topk_gates, atol=1e-3)
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-3)  # stored as float16
    one = rd.utterance("utt3")
    assert set(one) == {"avsr:4x2", "avsr:16x5"} and one["avsr:16x5"].mask("audio").sum() == 1


def test_trace_errors(tmp_path):
    w = TraceWriter(tmp_path / "t", scales=SCALES, layers=[0, 1], num_experts=E, top_k=K, utterances_per_shard=1)
    rec = _record("a", SCALES[0], lambda r, i: np.zeros((L, K), int), 4, 5)
    with pytest.raises(TraceError, match="expected"):
        w.add("a", SCALES[0], rec.roles, rec.positions, rec.topk_ids[:, :1], rec.topk_gates, rec.probs)
    with pytest.raises(TraceError, match="not one of"):
        w.add("a", Scale("asr", audio_rate=4), rec.roles, rec.positions, rec.topk_ids, rec.topk_gates, rec.probs)
    with pytest.raises(TraceError, match="expert ids"):
        w.add("a", 0, rec.roles, rec.positions, rec.topk_ids + E, rec.topk_gates, rec.probs)
    w.add_record(rec)
    w.end_batch()  # closes the shard of "a"
    w.add_record(_record("b", SCALES[0], lambda r, i: np.zeros((L, K), int), 4, 5))
    with pytest.raises(TraceError, match="already in a closed shard"):
        w.add_record(rec)
    with pytest.raises(TraceError, match="incomplete"):
        TraceReader(tmp_path / "t")
    assert TraceReader(tmp_path / "t", allow_incomplete=True).num_records == 1
    w.close()
    with pytest.raises(TraceError, match="already exists"):
        TraceWriter(tmp_path / "t", scales=SCALES, layers=[0, 1], num_experts=E, top_k=K)
    (tmp_path / "t" / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(TraceError, match="format"):
        TraceReader(tmp_path / "t")


# ----------------------------------------------------------------------------------------------------------------
# statistics over a trace with known answers


def _known_trace(path):
    """Layer 0: both scales pick {0,1} for every token. Layer 1: avsr:4x2 picks {0,1}, avsr:16x5 picks {2,3}.

    Router probabilities: uniform at avsr:4x2, one-hot on expert 2 at avsr:16x5. Two utterances, one per shard.
    """
    same = lambda r, i: np.array([[0, 1], [0, 1]])  # noqa: E731
    split = lambda r, i: np.array([[0, 1], [2, 3]])  # noqa: E731
    onehot = lambda r, i: np.tile(np.eye(E)[2], (L, 1))  # noqa: E731
    with TraceWriter(path, scales=SCALES, layers=[0, 1], num_experts=E, top_k=K, utterances_per_shard=1) as w:
        for u in ("u0", "u1"):
            w.add_record(_record(u, SCALES[0], same, 8, 5))
            w.add_record(_record(u, SCALES[3], split, 2, 2, probs_fn=onehot))
            w.end_batch()
    return TraceReader(path)


def test_stats_on_known_trace(tmp_path):
    st = S.compute_stats(_known_trace(tmp_path / "t"))
    json.dumps(st, allow_nan=False)  # strictly serialisable
    a, b, pair = "avsr:4x2", "avsr:16x5", "avsr:4x2|avsr:16x5"
    assert st["meta"]["scales"] == [a, b]
    # tokens per group: 2 utterances x (8 audio, 5 video, 4+2+3 text)
    assert st["tokens"][a] == {"audio": 16, "video": 10, "text": 18, "all": 44, "transcript": 6}
    assert st["tokens"][b] == {"audio": 4, "video": 4, "text": 18, "all": 26, "transcript": 6}
    np.testing.assert_allclose(st["usage"][a]["audio"], [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(st["usage"][b]["all"], [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(st["load_cv"][a]["all"], [1.0, 1.0])  # counts [n, n, 0, 0]
    np.testing.assert_allclose(st["jsd"][pair]["video"], [0.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(st["entropy"][a]["audio"], [math.log(4)] * 2, atol=1e-3)
    np.testing.assert_allclose(st["entropy"][b]["audio"], [0.0, 0.0], atol=1e-3)
    for g in ("audio", "video", "transcript", "all"):
        np.testing.assert_allclose(st["topk_overlap"][pair][g], [1.0, 0.0])
        np.testing.assert_allclose(st["top1_agreement"][pair][g], [1.0, 0.0])
        np.testing.assert_allclose(st["topk_overlap_baseline"][pair][g], [1.0, 0.0])
        np.testing.assert_allclose(st["top1_agreement_baseline"][pair][g], [1.0, 0.0])
    # coarse tokens compared: audio 2/utt (16 pools 4 each), video 2/utt, transcript 3/utt
    assert st["token_pairs"][pair] == {"audio": 4, "video": 4, "transcript": 6, "all": 14}
    summ = st["summary"]
    assert summ["cross_scale_jsd"] == pytest.approx(0.5)
    assert summ["top1_agreement"] == pytest.approx(0.5)
    assert summ["cross_layer_jsd"] == pytest.approx(0.5)  # 4x2: layers equal (0); 16x5: disjoint (1)
    assert st["meta"]["chance"]["topk_overlap"] == pytest.approx(K / E)


def test_token_level_agreement_with_mixed_routing(tmp_path):
    """Coarse audio token 0 at rate 16 pools fine tokens 0..3 at rate 4 with top-k {0,1},{0,2},{2,3},{1,0}."""
    fine_ids = [[0, 1], [0, 2], [2, 3], [1, 0], [0, 1], [0, 1], [0, 1], [0, 1]]

    def fine(r, i):
        return np.array([fine_ids[i], fine_ids[i]]) if r == "audio" else np.array([[0, 1], [0, 1]])

    with TraceWriter(tmp_path / "t", scales=SCALES, layers=[0, 1], num_experts=E, top_k=K, with_probs=False) as w:
        w.add_record(_record("u", SCALES[0], fine, 8, 5))
        w.add_record(_record("u", SCALES[2], lambda r, i: np.array([[0, 1], [0, 1]]), 2, 5))
    st = S.compute_stats(TraceReader(tmp_path / "t"))
    pair = "avsr:4x2|avsr:16x2"
    # coarse token 0: mean overlap (1+.5+0+1)/4, top-1 agreement 2/4; coarse token 1: 1 and 1
    np.testing.assert_allclose(st["topk_overlap"][pair]["audio"], [(0.625 + 1) / 2] * 2)
    np.testing.assert_allclose(st["top1_agreement"][pair]["audio"], [(0.5 + 1) / 2] * 2)
    np.testing.assert_allclose(st["topk_overlap"][pair]["video"], [1.0, 1.0])  # same video rate, same routing
    # independent routing with the same marginals: fine usage [7,6,2,1]/16 and top-1 usage [6,1,1,0]/8 vs
    # coarse usage [.5,.5,0,0] and top-1 usage [1,0,0,0]
    np.testing.assert_allclose(st["topk_overlap_baseline"][pair]["audio"], [13 / 16] * 2)
    np.testing.assert_allclose(st["top1_agreement_baseline"][pair]["audio"], [0.75] * 2)
    assert "entropy" not in st
