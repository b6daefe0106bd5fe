"""evaluate.py end to end: a tiny random MoME saved as a checkpoint, a tiny synthetic corpus, two SNRs and the
pretrained Whisper judge; every output file is checked. Plus the clear errors and the noise determinism."""
import csv
import json
from pathlib import Path

import pytest
import torch

from mome.config import load_config

SNRS = "[clean,0]"
SCALES = ["avsr:16x5", "avsr:4x2"]  # a subset of the 4 trained scales, in the order asked


def _save_checkpoint(model, run: Path, cfg, step: int = 1) -> Path:
    ckpt = run / "checkpoints" / f"step_{step:07d}"
    model.save_pretrained(ckpt, run_config=cfg)  # as training does: the run config, data and eval sections too
    (ckpt / "COMPLETE").write_text(f"{step}\n")
    return ckpt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny MoME checkpoint (random init, seeded) over a 16-utterance synthetic corpus (4 test utterances)."""
    from mome.models import build_model
    from mome.models.tiny import tiny_config

    root = tmp_path_factory.mktemp("eval")
    data = [
        "data.synth.num=16", "data.synth.test_fraction=0.25", "data.synth.val_fraction=0.0625",
        "data.synth.min_words=5", "data.synth.max_words=5", "data.synth.workers=1", "data.num_workers=0",
        "data.noise.babble_speakers=3", "logging.progress=false", "run_name=tiny_mome",
        f"output_dir={root / 'runs'}",
    ]
    cfg = tiny_config(root / "backbones", "mome", data)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ckpt = _save_checkpoint(model, root / "runs" / "tiny_mome", cfg)
    return root, ckpt, cfg


def _judge_folder() -> str:
    from mome.pretrained import resolve

    return str(resolve("whisper-tiny.en"))  # converted once into $MOME_CACHE (from the pip package)


def test_evaluate_end_to_end_with_judge(setup):
    from mome.evaluation.run import main
    from mome.metrics.wer import normalize, spell_numbers

    root, ckpt, cfg = setup
    out = root / "out"
    paths = main([
        "--checkpoint", str(ckpt.parent.parent), "--out", str(out),
        f"eval.snrs={SNRS}", "eval.num_beams=2", "eval.max_new_tokens=6", "eval.batch_size=3",
        "eval.max_utterances=3", f"eval.scales=[{','.join(SCALES)}]",
        f"eval.judge_model={_judge_folder()}", "eval.judge_max_new_tokens=16",
        "eval.clip_seconds=2", "eval.latency_repeats=1", "eval.latency_new_tokens=2",
    ])
    expected = {"results_json", "markdown", "wer_csv", "cer_csv", "cost_csv", "wer_vs_snr", "wer_vs_tokens", "config"}
    assert expected <= set(paths)
    for p in paths.values():
        assert Path(p).is_file() and Path(p).stat().st_size > 0 and Path(p).parent == out

    res = json.loads((out / "results.json").read_text())
    scales = SCALES
    recs = res["results"]
    model_recs = [r for r in recs if not r["judge"]]
    judge_recs = [r for r in recs if r["judge"]]
    assert sorted((r["scale"], r["snr"]) for r in model_recs) == sorted((s, n) for s in scales for n in ("clean", "0"))
    assert sorted(r["snr"] for r in judge_recs) == ["0", "clean"]
    assert {r["method"] for r in model_recs} == {"tiny_mome"} and {r["model_method"] for r in model_recs} == {"mome"}
    assert res["meta"]["snrs"] == ["clean", "0"] and res["meta"]["noise_type"] == "babble"

    from mome.data.manifest import read_manifest

    test_csv = next((root / "backbones" / "cache").glob("synth/*/test.csv"))
    refs = {row.text for row in read_manifest(test_csv)[:3]}  # eval.max_utterances=3: the first three rows
    assert len(refs) == 3
    for r in recs:
        lines = [json.loads(x) for x in (out / r["hypotheses"]).read_text().splitlines()]
        assert len(lines) == r["num_utterances"] == 3
        assert {x["ref"] for x in lines} == refs
        assert all(x["snr"] == r["snr"] and x["scale"] == r["scale"] for x in lines)
        # corpus WER of the record = sum of per-utterance errors / sum of reference words in its JSONL
        errs, words = sum(x["word_errors"] for x in lines), sum(x["ref_words"] for x in lines)
        assert r["wer"] == pytest.approx(errs / words) and r["ref_words"] == words
        assert all(x["hyp_norm"] == normalize(x["hyp"]) for x in lines)
        if r["judge"]:  # Whisper's own text is kept; digits are spelled out before scoring
            assert all(x["hyp"] == spell_numbers(x["hyp_raw"]) for x in lines)
        assert r["noise_type"] == (None if r["snr"] == "clean" else "babble")
    # the judge is a real recogniser: on the clean synthetic speech it gets some words right (Whisper tiny.en finds
    # these short command sentences hard; a random model gets none)
    judge_clean = next(r for r in judge_recs if r["snr"] == "clean")
    assert judge_clean["method"] == "whisper-tiny.en (judge)"
    assert judge_clean["substitutions"] + judge_clean["deletions"] < judge_clean["ref_words"], judge_clean

    with open(out / "wer.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Method", "Scale", "clean", "0 dB"]
    assert [r[:2] for r in rows[1:]] == [["tiny_mome", s] for s in scales] + [[judge_clean["method"], "full"]]
    for row in rows[1:]:
        rec = {(r["scale"], r["snr"]): r for r in recs if r["method"] == row[0]}
        assert row[2] == f"{100 * rec[(row[1], 'clean')]['wer']:.1f}" and row[3] == f"{100 * rec[(row[1], '0')]['wer']:.1f}"

    cost = res["cost"]
    assert [c["scale"] for c in cost] == scales
    # 2 s clip: 100 Whisper frames and 50 video frames pooled; + BOS, 4 markers, 36-character instruction
    for c in cost:
        a, v = map(int, c["scale"].split(":")[1].split("x"))
        assert c["llm_tokens"] == 100 // a + 50 // v + 1 + 4 + len(cfg.model.prompts.avsr)
        assert c["prefill_flops"] > 0 and c["prefill_ms"] > 0 and c["decode_ms_per_token"] > 0
    assert cost[0]["prefill_flops"] < cost[1]["prefill_flops"]  # 16x5 is cheaper than 4x2
    with open(out / "cost.csv") as f:
        assert len(list(csv.reader(f))) == 1 + len(scales)

    md = (out / "results.md").read_text()
    assert "| Method | Scale | clean | 0 dB |" in md and "Elastic-inference cost" in md
    for png in ("wer_vs_snr.png", "wer_vs_tokens.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert load_config(out / "config.yaml").eval.snrs == ["clean", "0"]


def test_clear_errors(setup):
    from mome.evaluation.run import main

    root, ckpt, _ = setup
    base = ["--checkpoint", str(ckpt), "--out", str(root / "bad"), "eval.judge=false"]
    with pytest.raises(SystemExit, match=r"scale 'asr:4'.*not trained by this checkpoint.*avsr:4x2"):
        main(base + ["eval.scales=[asr:4]"])
    with pytest.raises(SystemExit, match=r"split 'test': label CSV .*nope.csv not found"):
        main(base + ["data.test_csv=nope.csv"])
    with pytest.raises(SystemExit, match=r"data.transforms.crop_size: evaluation 80, checkpoint 88"):
        main(base + ["data.transforms.crop_size=80"])
    with pytest.raises(SystemExit, match=r"the judge '/nonexistent/whisper' is not available"):
        main(base[:-1] + ["eval.judge_model=/nonexistent/whisper"])
    (root / "empty.csv").write_text("")
    with pytest.raises(SystemExit, match=r"avsr:4x2 snr=clean \(test split\): no utterances to score"):
        main(base + [f"data.test_csv={root / 'empty.csv'}", "eval.scales=[avsr:4x2]", "eval.snrs=[clean]",
                     "eval.latency=false"])
    with pytest.raises(SystemExit, match=r"no such run or checkpoint folder"):
        main(["--checkpoint", str(root / "missing")])
    with pytest.raises(SystemExit, match=r"unknown config key 'eval.snr'"):
        main(base + ["eval.snr=[0]"])


def test_noise_is_seeded_and_on_audio_only(setup):
    """Two loaders at the same SNR give identical audio; noise changes the audio but never the video."""
    from mome.evaluation.run import build_loader, loader_config

    _, _, cfg = setup
    lcfg = loader_config(cfg)  # eval.batch_size=8: the 4 test utterances in one batch
    clean, noisy_a, noisy_b = (next(iter(build_loader(lcfg, s))) for s in ("clean", "0", "0"))
    assert torch.equal(noisy_a["audio"], noisy_b["audio"])
    assert not torch.allclose(clean["audio"], noisy_a["audio"])
    assert torch.equal(clean["video"], noisy_a["video"])
    assert clean["ids"] == noisy_a["ids"]



def test_compare_two_checkpoints_in_one_table(setup):
    """Several checkpoints (here MoME and MTSK-MS, random init) in one table, one results.json and one plot."""
    from mome.evaluation.run import main
    from mome.models import build_model
    from mome.models.tiny import tiny_config

    root, ckpt, cfg = setup
    other_cfg = tiny_config(root / "backbones", "mtsk_ms", [f"data.{k}={v}" for k, v in (
        ("synth.num", 16), ("synth.test_fraction", 0.25), ("synth.val_fraction", 0.0625), ("synth.min_words", 5),
        ("synth.max_words", 5), ("noise.babble_speakers", 3))] + ["run_name=tiny_mtsk"])
    other = _save_checkpoint(build_model(other_cfg).eval(), root / "runs" / "tiny_mtsk", other_cfg, step=3)
    out = root / "compare"
    main(["--checkpoint", str(ckpt), "--checkpoint", str(other.parent.parent), "--label", "MoME", "--label", "MTSK-MS",
          "--out", str(out), "eval.snrs=[clean,-5]", "eval.scales=[avsr:16x5]", "eval.judge=false",
          "eval.latency=false", "eval.max_utterances=2", "eval.num_beams=1", "eval.max_new_tokens=4"])
    res = json.loads((out / "results.json").read_text())
    assert [(c["label"], c["method"]) for c in res["meta"]["checkpoints"]] == [("MoME", "mome"), ("MTSK-MS", "mtsk_ms")]
    assert res["meta"]["checkpoints"][1]["path"] == str(other)  # the run folder resolved to its newest checkpoint
    with open(out / "wer.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Method", "Scale", "clean", "-5 dB"]
    assert [r[:2] for r in rows[1:]] == [["MoME", "avsr:16x5"], ["MTSK-MS", "avsr:16x5"]]
    assert [c["method"] for c in res["cost"]] == ["MoME", "MTSK-MS"]
    assert all(c["prefill_ms"] is None for c in res["cost"])  # eval.latency=false: FLOPs and tokens only
    assert res["cost"][0]["llm_tokens"] == res["cost"][1]["llm_tokens"]
    from transformers import AutoConfig

    from mome.evaluation.cost import LLMShape, adapter_flops_per_token, llm_flops

    shape = LLMShape.from_hf_config(AutoConfig.from_pretrained(root / "backbones" / "llm"))
    for row, c in zip(res["cost"], (cfg, other_cfg)):  # each method's own adapters are counted
        assert row["prefill_flops"] == llm_flops(shape, row["llm_tokens"], adapter_flops_per_token(c.model, shape))[
            "prefill_flops"]
    for png in ("wer_vs_snr.png", "wer_vs_tokens.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
