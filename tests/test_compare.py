"""The comparison's logic on synthetic records: seed spread, verdicts, tables, the page; the compare YAML and its
time estimate. The end-to-end ``--quick`` run is in ``tests/test_compare_e2e.py`` (slow)."""
import json
import shutil

import pytest

from mome.experiments import report as R
from mome.experiments.report import Cell, Comparison, Results
from mome.experiments.spec import SpecError, flatten, load_spec

PAIRS = ["avsr:4x2", "avsr:4x5", "avsr:16x2", "avsr:16x5"]
METHODS = [
    {"key": "mome", "label": "MoME", "row": "MoME", "seeds": [0, 1]},
    {"key": "mome_per_scale", "label": "MoME per-scale", "row": "MoME per-scale", "seeds": [0]},
    {"key": "mtsk_ms", "label": "MTSK MS", "row": "MTSK MS", "seeds": [0]},
    {"key": "mtsk_ss", "label": "MTSK SS", "row": "MTSK SS", "seeds": [0]},
    {"key": "llama_avsr_4x2", "label": "AVSR (4,2)", "row": "Llama-AVSR", "seeds": [0]},
    {"key": "llama_avsr_16x5", "label": "AVSR (16,5)", "row": "Llama-AVSR", "seeds": [0]},
    {"key": "mome_asr", "label": "MoME ASR", "row": "MoME ASR", "seeds": [0]},
]
TPS = {"avsr:4x2": 25.0, "avsr:4x5": 17.5, "avsr:16x2": 15.625, "avsr:16x5": 8.125, "asr:4": 12.5, "asr:16": 3.125}


def rec(key, seed, scale, snr, wer, kind=None):
    return {"key": key, "seed": seed, "scale": scale, "snr": snr, "wer": wer, "run_id": f"{key}_s{seed}",
            "kind": kind or ("clean" if snr == "clean" else "noise"), "num_beams": 1, "num_utterances": 48,
            "tokens_per_second": TPS[scale], "method": f"{key}_s{seed}", "task": scale.split(":")[0]}


def headline(jsd, overlap=0.4, base=0.3):
    return {"cross_scale_jsd": jsd, "cross_layer_jsd": 0.2, "topk_overlap": overlap, "topk_overlap_baseline": base,
            "top1_agreement": 0.3, "top1_agreement_baseline": 0.2, "entropy": 2.5, "load_cv": 0.4}


def make_doc(mome=(0.30, 0.32), mtsk=0.40, mome_active=1_000, mtsk_active=2_000, asr_noisy=0.60, av_noisy=0.45,
             coarse_bonus=0.10, routing=((0.02, 0.03), 0.10), beam=None):
    """A results.json: MoME's two seeds at ``mome`` (+ the coarse pair a bit worse for MTSK by ``coarse_bonus``)."""
    records = []
    for p in PAIRS:
        for seed, w in enumerate(mome):
            records.append(rec("mome", seed, p, "clean", w))
        records.append(rec("mome_per_scale", 0, p, "clean", mome[0] + 0.01))
        extra = coarse_bonus if p == "avsr:16x5" else 0.0
        records.append(rec("mtsk_ms", 0, p, "clean", mtsk + extra))
        records.append(rec("mtsk_ss", 0, p, "clean", mtsk + extra + 0.02))
    records.append(rec("llama_avsr_4x2", 0, "avsr:4x2", "clean", 0.5))
    records.append(rec("llama_avsr_16x5", 0, "avsr:16x5", "clean", 0.6))
    for snr in ("5", "0", "-5"):
        for p in ("avsr:4x2", "avsr:16x5"):
            records += [rec("mome", 0, p, snr, av_noisy), rec("mome", 1, p, snr, av_noisy + 0.02)]
        for a in ("asr:4", "asr:16"):
            records.append(rec("mome_asr", 0, a, snr, asr_noisy))
    for a in ("asr:4", "asr:16"):
        records.append(rec("mome_asr", 0, a, "clean", 0.35))
    if beam is not None:
        records += [rec("mome", 0, p, "clean", beam, kind="beam") for p in PAIRS]
    params = {"mome": mome_active, "mome_per_scale": mome_active, "mtsk_ms": mtsk_active, "mtsk_ss": mtsk_active,
              "llama_avsr_4x2": mtsk_active, "llama_avsr_16x5": mtsk_active, "mome_asr": mome_active}
    runs = [{"run_id": f"{m['key']}_s{s}", "key": m["key"], "seed": s, "label": m["label"], "row": m["row"],
             "budget": {"max_steps": 120, "max_minutes": 7}, "clean_epochs": 1,
             "train": {"seconds": 300.0, "steps": 120, "samples": 540, "epoch": 0},
             "params": {"adapter_active": params[m["key"]], "totals": {"trainable": 10 * params[m["key"]]}},
             "eval": {"clean": {"kind": "clean", "seconds": 60.0, "decodes": 192}}}
            for m in METHODS for s in m["seeds"]]
    (j0, j1), abl = routing
    return {
        "meta": {"created": "2026-01-01T00:00:00", "command": "python -m mome.experiments.compare", "out": "x",
                 "machine": {"cpu": "Test CPU", "cores": 2}, "git": {"commit": "abc"}},
        "spec": {"config": "c.yaml", "recipe": "demo.yaml", "quick": False, "methods": METHODS,
                 "evaluation": {"pairs": PAIRS, "clean_extra": ["asr:4", "asr:16"],
                                "noise_scales": ["avsr:4x2", "avsr:16x5", "asr:4", "asr:16"],
                                "snrs": ["5", "0", "-5"], "judge": True,
                                "beam": {"method": "mome", "num_beams": 3}},
                 "claims": {"mome": "mome", "mtsk": ["mtsk_ms", "mtsk_ss"], "coarsest": "avsr:16x5",
                            "audio_only": {"method": "mome_asr",
                                           "pairs": [["avsr:4x2", "asr:4"], ["avsr:16x5", "asr:16"]]}}},
        "plan": [{"stage": "train", "what": "mome_s0 (4 scales)", "seconds": 400.0, "total_minutes": 100.0}],
        "extra_seeds": {"best": "mtsk_ms"},
        "runs": runs,
        "records": records,
        "judge": [{"method": "whisper-tiny.en (judge)", "snr": s, "wer": 0.1 + 0.1 * i, "scale": "full"}
                  for i, s in enumerate(["clean", "5", "0", "-5"])],
        "protocol": {"split": "test", "utterances": [48], "noise": "babble"},
        "routing": [
            {"name": "mome_s0", "label": "MoME (seed 0)", "role": "trained", "seed": 0, "key": "mome",
             "stats": "routing/mome_s0/stats.json", "headline": headline(j0)},
            {"name": "mome_s1", "label": "MoME (seed 1)", "role": "trained", "seed": 1, "key": "mome",
             "stats": "routing/mome_s1/stats.json", "headline": headline(j1)},
            {"name": "mome_s0_step0", "label": "MoME at step 0", "role": "initial", "seed": 0, "key": "mome",
             "stats": "routing/mome_s0_step0/stats.json", "headline": headline(0.01, 0.3, 0.3)},
            {"name": "mome_per_scale_s0", "label": "per-scale (seed 0)", "role": "ablation", "seed": 0,
             "key": "mome_per_scale", "stats": "routing/x/stats.json", "headline": headline(abl)},
        ],
    }


# ---- cells and comparisons


def test_cell_format_and_spread():
    assert R.fmt_cell(Cell([0.412])) == "41.2"
    c = Cell([0.40, 0.42], [0, 1])
    assert R.fmt_cell(c) == "41.0 ±1.0" and c.spread == pytest.approx(0.02)
    assert R.fmt_cell(None) == R.MISSING


def test_comparison_outcomes():
    a, b = Cell([0.30, 0.32]), Cell([0.40])
    assert Comparison(a, b, 0.02, True).outcome == R.LOWER
    assert Comparison(b, a, 0.02, True).outcome == R.HIGHER
    assert Comparison(Cell([0.30, 0.34]), Cell([0.33]), 0.04, True).outcome == R.NOT_DIST


def test_single_seed_borrows_the_largest_spread_at_that_cell():
    res = Results(make_doc(mome=(0.30, 0.36)))
    # two single-seed MTSK cells: no own spread, the pooled one is MoME's 6 points at that pair
    c = res.compare(res.cell("mtsk_ms", "avsr:4x2"), res.cell("mtsk_ss", "avsr:4x2"), ["avsr:4x2"], "clean")
    assert c.threshold == pytest.approx(0.06) and c.measured
    assert c.outcome == R.NOT_DIST  # 2 points apart, within 6


def test_combine_statuses():
    assert R.combine([R.LOWER, R.LOWER]) == R.HOLDS
    assert R.combine([R.LOWER, R.NOT_DIST]) == R.PARTLY
    assert R.combine([R.NOT_DIST, R.NOT_DIST]) == R.NOT_DIST
    assert R.combine([R.LOWER, R.HIGHER]) == R.FAILS
    assert R.combine([]) == R.UNTESTED


# ---- verdicts


def test_mome_vs_mtsk_holds():
    v = R.verdict_mome_vs_mtsk(Results(make_doc()))
    assert v.status == R.HOLDS, v
    assert "0.50x" in v.summary


def test_mome_vs_mtsk_within_spread_is_not_a_win():
    v = R.verdict_mome_vs_mtsk(Results(make_doc(mome=(0.36, 0.44), mtsk=0.41, coarse_bonus=0.0)))
    assert v.status == R.NOT_DIST, v


def test_mome_vs_mtsk_more_parameters_fails_even_with_lower_wer():
    v = R.verdict_mome_vs_mtsk(Results(make_doc(mome_active=2_500, mtsk_active=1_000)))
    assert v.status == R.FAILS
    assert "more, not fewer" in v.summary and "2.50x" in v.summary


def test_mome_vs_mtsk_worse_somewhere_fails():
    v = R.verdict_mome_vs_mtsk(Results(make_doc(mome=(0.50, 0.51), mtsk=0.40, coarse_bonus=0.3)))
    assert v.status == R.FAILS
    assert "higher at (4,2)" in v.summary


def test_gap_largest_at_the_coarsest_pair():
    assert R.verdict_gap_coarsest(Results(make_doc(coarse_bonus=0.10))).status == R.HOLDS
    v = R.verdict_gap_coarsest(Results(make_doc(coarse_bonus=0.0)))
    assert v.status == R.NOT_DIST  # the same gap everywhere
    v = R.verdict_gap_coarsest(Results(make_doc(coarse_bonus=-0.08)))
    assert v.status == R.FAILS and "largest at (4,2)" in v.summary


def test_av_vs_audio_only_under_noise():
    assert R.verdict_av_vs_audio(Results(make_doc(av_noisy=0.40, asr_noisy=0.60))).status == R.HOLDS
    v = R.verdict_av_vs_audio(Results(make_doc(av_noisy=0.70, asr_noisy=0.60)))
    assert v.status == R.FAILS
    assert any("clean: shown, not judged" in d for d in v.details)


def test_routing_verdict_uses_the_seed_spread_of_the_trained_model():
    assert R.verdict_routing(Results(make_doc(routing=((0.02, 0.03), 0.10)))).status == R.HOLDS
    assert R.verdict_routing(Results(make_doc(routing=((0.02, 0.12), 0.10)))).status == R.NOT_DIST
    assert R.verdict_routing(Results(make_doc(routing=((0.20, 0.21), 0.10)))).status == R.FAILS


def test_beam_verdict():
    doc = make_doc(beam=0.20)
    v = R.verdict_beam(Results(doc))
    assert v.status == "changes the table"
    assert R.verdict_beam(Results(make_doc(beam=0.30))).status == "no change beyond the spread"
    assert R.verdict_beam(Results(make_doc())) is None


# ---- tables and page


def test_clean_table_merges_rows_and_adds_the_judge():
    h, rows = R.clean_table(Results(make_doc()))
    assert h[:5] == ["Method", "(4,2)", "(4,5)", "(16,2)", "(16,5)"]
    by = {r[0]: r for r in rows}
    assert by["MoME"][1] == "31.0 ±1.0" and by["MoME"][5] == "0,1" and by["MoME"][6] == "1,000"
    assert by["Llama-AVSR"][1:5] == ["50.0", R.MISSING, R.MISSING, "60.0"]
    assert "MoME ASR" not in by  # no AVSR pair: not in the main table
    assert rows[-1][0].startswith("whisper-tiny.en (judge)") and rows[-1][1] == "10.0"


def test_noise_table_rows():
    h, rows = R.noise_table(Results(make_doc()))
    assert h == ["Method", "Scale", "clean", "5 dB", "0 dB", "-5 dB"]
    keys = [(r[0], r[1]) for r in rows]
    assert ("MoME", "(4,2)") in keys and ("MoME ASR", "asr:4") in keys and keys[-1][1] == "full audio"
    assert ("MoME per-scale", "(4,2)") not in keys  # decoded clean only


def test_report_from_results_json_alone(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(make_doc(beam=0.25)))
    paths = R.write_report(tmp_path)
    page = (tmp_path / "RESULTS.md").read_text()
    for p in ("wer_vs_scale.png", "wer_vs_snr.png", "routing_jsd.png", "table_clean.md", "table_noise.csv"):
        assert (tmp_path / p).is_file(), p
    assert "**holds**" in page and "Test CPU" in page and "Greedy against beam search" in page
    first = (tmp_path / "table_clean.md").read_text()
    R.write_report(tmp_path)
    assert (tmp_path / "table_clean.md").read_text() == first
    assert paths["page"] == tmp_path / "RESULTS.md"


def test_page_warns_without_seeds_and_flags_quick():
    doc = make_doc(mome=(0.30,))
    for m in doc["spec"]["methods"]:
        m["seeds"] = [0]
    doc["records"] = [r for r in doc["records"] if r["seed"] == 0]
    doc["routing"] = [e for e in doc["routing"] if e["seed"] == 0]
    doc["spec"]["quick"] = True
    text = R.page(doc, {})
    assert "No cell has two seeds" in text and "Quick run" in text


# ---- the compare YAML


def test_flatten_nested_and_dotted():
    assert flatten({"train": {"max_steps": 3}, "eval.snrs": ["clean", "0"], "x": True}, "w") == [
        "train.max_steps=3", 'eval.snrs=["clean", "0"]', "x=true"]


def test_compare_demo_spec_resolves_every_run(tmp_path):
    spec = load_spec("configs/compare_demo.yaml", out=tmp_path)
    runs = {r.run_id: spec.run_config(r) for r in spec.primary_runs()}
    assert set(runs) == {"mome_s0", "mome_s1", "mome_per_scale_s0", "mtsk_ms_s0", "mtsk_ss_s0", "mtsk_mss_s0",
                         "llama_avsr_4x2_s0", "llama_avsr_16x5_s0", "mome_i_16x5_s0", "mome_asr_s0"}
    assert runs["mome_per_scale_s0"].model.mome.router == "per_scale"
    assert list(runs["llama_avsr_16x5_s0"].model.compression.audio_rates) == [16]
    assert list(runs["mome_asr_s0"].model.tasks) == ["asr"]
    steps = {c.train.max_steps for c in runs.values()}
    assert len(steps) == 1 and runs["mome_s1"].train.seed == 1 and runs["mome_s0"].train.resume == "auto"
    assert runs["mome_s0"].output_dir == str(tmp_path / "work" / "runs")


def test_compare_core_spec_trains_every_run_on_the_demo_budget(tmp_path):
    from mome.config import load_config

    spec = load_spec("configs/compare_core.yaml", out=tmp_path)
    runs = {r.run_id: spec.run_config(r) for r in spec.primary_runs()}
    assert set(runs) == {"mome_s0", "mome_s1", "mtsk_ms_s0"}
    demo = load_config("configs/demo.yaml")
    for cfg in runs.values():  # the demo recipe with one budget for every method
        assert (cfg.train.max_steps, cfg.train.max_minutes) == (400, 12)
        assert (cfg.train.lr, cfg.model.matryoshka, cfg.data.max_frames) == (
            demo.train.lr, demo.model.matryoshka, demo.data.max_frames)
    assert runs["mtsk_ms_s0"].model.method == "mtsk_ms" and runs["mome_s1"].train.seed == 1


def test_a_sampled_matryoshka_step_is_costed_as_one_scale():
    from mome.experiments import estimate as E

    pairs = ["avsr:4x2", "avsr:4x5", "avsr:16x2", "avsr:16x5"]
    assert E.step_seconds(pairs, "sample") == pytest.approx(E.step_seconds(pairs[:1]))
    assert E.step_seconds(pairs, "all") > 2 * E.step_seconds(pairs, "sample")
    # the 20-minute stop caps a long sampled run
    assert E.train_seconds(pairs, 10_000, 20, 0, 0, "sample") == pytest.approx(E.RUN_OVERHEAD_S + 1200)


def test_compare_demo_fits_two_hours(tmp_path):
    from mome.experiments.compare import Comparison

    rows = Comparison(load_spec("configs/compare_demo.yaml", out=tmp_path)).plan()
    assert rows[-1]["total_minutes"] <= 120, rows
    trains = [r for r in rows if r["stage"] == "train"]
    assert len(trains) == 11  # 10 primary runs + the best MTSK's second seed


def test_quick_spec_uses_tiny_backbones(tmp_path):
    spec = load_spec("configs/compare_demo.yaml", quick=True, out=tmp_path)
    cfg = spec.run_config(spec.primary_runs()[0])
    assert cfg.model.llm.random_init and cfg.train.max_steps <= 5 and cfg.cache_dir == ""
    assert str(tmp_path) in cfg.model.llm.name


def test_spec_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("recipe: ../configs/demo.yaml\nmethods: [{key: a}]\nbogus: 1\n")
    with pytest.raises(SpecError, match="bogus"):
        load_spec(bad)
    (tmp_path / "demo.yaml").write_text((__import__("pathlib").Path("configs/demo.yaml")).read_text())
    bad.write_text("recipe: demo.yaml\nmethods: [{key: a}]\nclaims: {mome: b}\n")
    with pytest.raises(SpecError, match="'b'"):
        load_spec(bad)
    bad.write_text("recipe: demo.yaml\nmethods: [{key: a, set: {train.lrr: 1}}]\n")
    spec = load_spec(bad)
    with pytest.raises(SpecError, match="train.lrr"):
        spec.run_config(spec.primary_runs()[0])


def test_finished_run_detection(tmp_path):
    """A run is finished when its newest complete checkpoint is at train.max_steps or stopped at its time budget;
    an older or incomplete checkpoint means: resume."""
    from mome.experiments.compare import Comparison

    comp = Comparison(load_spec("configs/compare_demo.yaml", out=tmp_path))
    run = comp.spec.primary_runs()[0]
    ckpts = comp.spec.run_dir(run) / "checkpoints"
    assert comp.finished(run) is None  # no run folder yet: a fresh run

    def checkpoint(step, complete=True, **trainer):
        d = ckpts / f"step_{step:07d}"
        (d / "training_state").mkdir(parents=True)
        (d / "training_state" / "trainer.json").write_text(json.dumps({"trainer": {"step": step, **trainer}}))
        if complete:
            (d / "COMPLETE").write_text("{}")

    last = int(comp.cfg(run).train.max_steps)
    checkpoint(40)
    assert comp.finished(run) is None  # interrupted at step 40: resume
    checkpoint(last, complete=False)
    assert comp.finished(run) is None  # written half-way: not a checkpoint
    checkpoint(80, time_up=1)
    assert comp.finished(run)["step"] == 80  # stopped by train.max_minutes: finished
    shutil.rmtree(ckpts / f"step_{last:07d}")
    checkpoint(last)
    assert comp.finished(run)["step"] == last


def test_config_changes_of_a_trained_run_are_named(tmp_path):
    from mome.config import save_config
    from mome.experiments.compare import Comparison

    comp = Comparison(load_spec("configs/compare_demo.yaml", out=tmp_path))
    run = comp.spec.primary_runs()[0]
    assert comp.config_changes(run) == []  # never trained
    save_config(comp.cfg(run), comp.work / "configs" / f"{run.run_id}.yaml")
    assert comp.config_changes(run) == []
    other = load_spec("configs/compare_demo.yaml", out=tmp_path)
    other.common = other.common + ("train.max_steps=7", "eval.max_utterances=3")  # eval keys: not a retrain
    assert Comparison(other).config_changes(run) == ["train.max_steps"]


def test_an_evaluation_is_reused_only_under_the_same_settings(tmp_path):
    from mome.experiments.compare import Comparison, write_json

    comp = Comparison(load_spec("configs/compare_demo.yaml", out=tmp_path))
    run = comp.spec.primary_runs()[0]
    ov = comp.eval_overrides(run, scales=["avsr:4x2"], snrs=["clean"], judge=False)
    assert "eval.max_utterances=120" in ov and 'eval.scales=["avsr:4x2"]' in ov
    timing = tmp_path / "timing.json"
    assert comp.decoded(timing, ov) is None  # nothing decoded yet
    write_json(timing, {"seconds": 1.0, "settings": ov})
    assert comp.decoded(timing, ov)["seconds"] == 1.0
    # the YAML's eval section changed since (e.g. more utterances): decode again, not the old numbers
    assert comp.decoded(timing, [o for o in ov if "max_utterances" not in o] + ["eval.max_utterances=40"]) is None
    write_json(timing, {"seconds": 1.0})  # written before settings were recorded
    assert comp.decoded(timing, ov) is None
