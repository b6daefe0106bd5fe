"""Expert-activation analysis end to end on tiny random MoME checkpoints (shared and per-scale router)."""
import json

import numpy as np
import pytest
import torch

from analysis.expert_activation import main, render, save_run, trace_model
from analysis.stats import compute_stats
from analysis.trace import ROLE_CODE, TraceReader
from mome.models import build_model
from mome.models.tiny import random_batch, tiny_config
from mome.models.checkpoints import load_model

FRAMES = [30, 25, 40]  # video frames per utterance; audio = 2 Whisper frames per video frame


def _checkpoint(folder, run, seed, overrides=()):
    """A run folder with one complete checkpoint of a tiny model whose trainable weights are random. Its data
    config points at a 12-utterance synthetic corpus (generated on first use)."""
    cfg = tiny_config(folder / "backbones", overrides=[
        "model.tasks=[avsr,asr]", f"run_name={run}", f"output_dir={folder}", f"data.root={folder / 'corpus'}",
        "data.synth.num=12", "data.synth.test_fraction=0.34", "data.synth.workers=1", "data.num_workers=0",
        "logging.progress=false", *overrides])
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ckpt = folder / run / "checkpoints" / "step_0000001"
    model.save_pretrained(ckpt, run_config=cfg)
    (ckpt / "COMPLETE").write_text("1\n")
    return folder / run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analysis_e2e")
    batches = [random_batch(FRAMES, seed=i) for i in range(2)]
    for i, b in enumerate(batches):
        b["ids"] = [f"b{i}u{j}" for j in range(len(FRAMES))]
    out = {}
    for run, router, seed in (("shared", "shared", 0), ("per_scale", "per_scale", 1)):
        run_dir = _checkpoint(folder, run, seed, [f"model.mome.router={router}"])
        cfg, model = load_model(run_dir)
        reader, sims = trace_model(model, batches, model.scales, folder / "out" / run, utterances_per_shard=2,
                                   similarity_utterances=1, similarity_layers=[-1, 1],
                                   meta={"checkpoint": run, "split": "random"}, progress=False)
        st = compute_stats(reader)
        save_run(folder / "out" / run, st, sims)
        out[run] = (model, reader, st, sims, run_dir)
    return folder, batches, out


def test_trace_matches_the_model(runs):
    folder, batches, out = runs
    model, reader, st, sims, _ = out["shared"]
    assert reader.num_records == 2 * len(FRAMES) * len(model.scales)
    assert len(list(reader.shards())) == 2  # one batch of 3 utterances per shard (>= 2 per shard)
    recs = reader.utterance("b0u2")  # 40 video frames = 80 Whisper frames
    for name, rec in recs.items():
        s = rec.scale
        assert rec.mask("audio").sum() == 80 // s.audio_rate
        assert rec.mask("video").sum() == (40 // s.video_rate if s.uses_video else 0)
        assert rec.mask("transcript").sum() == recs["avsr:4x2"].mask("transcript").sum() > 0
        assert not (rec.roles == ROLE_CODE["pad"]).any()
        np.testing.assert_array_equal(rec.probs.astype(np.float32).argmax(-1), rec.topk_ids[..., 0])
    # the routing recorded in the trace is the routing of a direct forward of the same utterance alone
    single = {k: v[2:3] for k, v in batches[0].items()}
    single["audio"], single["video"] = single["audio"][:, : 640 * 40], single["video"][:, :40]
    with model.record_routing() as log, torch.no_grad():
        model(single, scales=[model.scales[0]])
    direct = next(log.calls[0].records())
    np.testing.assert_array_equal(direct["topk_ids"], recs[model.scales[0].name].topk_ids)
    assert set(st["tokens"]["asr:4"]) == {"audio", "text", "transcript", "all"}  # no video tokens in ASR rows
    assert {s["source"] for s in sims} == {"projector", "layer 1"} and {s["utterance"] for s in sims} == {"b0u0"}


def test_projector_similarity_is_exact_for_a_rate_pair(runs):
    """Projector outputs at rates 4 and 16 come from the same Whisper frames: recompute one matrix directly."""
    folder, batches, out = runs
    model, _, _, sims, _ = out["shared"]
    sim = next(s for s in sims if s["source"] == "projector" and s["modality"] == "audio")
    b = {k: v[:1] for k, v in batches[0].items()}
    b["audio"], b["video"] = b["audio"][:, : 640 * 30], b["video"][:, :30]
    with torch.no_grad():
        feats = model.encode(b, audio=True, video=False)
        fine, _ = model.project(feats, "audio", 4)
        coarse, _ = model.project(feats, "audio", 16)
    f = torch.nn.functional.normalize(fine[0], dim=-1)
    c = torch.nn.functional.normalize(coarse[0], dim=-1)
    np.testing.assert_allclose(sim["sim"], (c @ f.T).numpy(), atol=1e-5)


def test_report_compares_two_checkpoints(runs):
    folder, _, out = runs
    md = render(folder / "out", [("shared router", folder / "out" / "shared"),
                                 ("per-scale router", folder / "out" / "per_scale")])
    text = md.read_text()
    assert "| metric | shared router | per-scale router |" in text
    for name in ("usage_all", "usage_audio", "usage_video", "modality_usage", "consistency", "entropy_balance",
                 "similarity"):
        assert (folder / "out" / f"{name}.png").stat().st_size > 5000 and f"({name}.png)" in text
    stats = json.loads((folder / "out" / "per_scale" / "stats.json").read_text())
    assert stats["similarity"] and stats["summary"]["cross_scale_jsd"] is not None


def test_cli_two_checkpoints_with_noise(runs, capsys):
    """``python -m analysis.expert_activation`` on the split of the synthetic corpus, at 5 dB white noise."""
    folder, _, out = runs
    dest = folder / "cli"
    main(["--checkpoint", str(out["shared"][4]), "--compare", str(out["per_scale"][4] / "checkpoints" / "step_0000001"),
          "--out", str(dest), "analysis.max_utterances=3", "analysis.snr=5", "data.noise.type=white",
          "analysis.layers=[1]"])
    assert (dest / "report.md").is_file() and "report.md" in capsys.readouterr().out
    for run in ("shared", "per_scale"):  # a checkpoint folder is labelled by its run
        reader = TraceReader(dest / run / "trace")
        assert reader.layers == [1] and len(reader.utterance_ids) == 3
        assert reader.meta["snr"] == 5.0 and reader.meta["noise_type"] == "white" and reader.meta["split"] == "test"
        st = json.loads((dest / run / "stats.json").read_text())
        assert np.asarray(st["usage"]["avsr:4x2"]["all"]).shape == (1, 4)
    text = (dest / "report.md").read_text()
    assert "| metric | shared | per_scale |" in text and "3 utterances" in text
    # --reuse redraws from the saved statistics without running the models
    (dest / "report.md").unlink()
    main(["--checkpoint", str(folder / "missing"), "--compare", str(folder / "missing2"), "--labels", "shared",
          "per_scale", "--out", str(dest), "--reuse"])
    assert (dest / "report.md").read_text() == text


def test_cli_rejects_a_model_without_router(tmp_path, runs):
    folder, _, _ = runs
    run = _checkpoint(folder, "lora", 0, ["model.method=mtsk_ms"])
    with pytest.raises(SystemExit, match="has no router"):
        main(["--checkpoint", str(run), "--out", str(tmp_path / "x")])
