"""Synthetic corpus: grammar, visemes, deterministic generation, read-back, A/V alignment, splits, CLI, idempotence."""
import json

import numpy as np
import pytest

from mome.data.grammar import SLOTS, VOCABULARY, sample_sentence, templates_between
from mome.data.manifest import read_manifest
from mome.data.media import read_audio, read_video
from mome.config import SynthConfig
from mome.data.synth import assign_splits, generate_corpus, main, media_key, read_marker
from mome.data.visemes import mouth_track, viseme_targets
from tests.data_fixtures import TINY, session_dir, tiny_corpus


def test_grammar_vocabulary_lengths_and_determinism():
    assert len(VOCABULARY) >= 50
    for slot in ("colour", "letter", "digit", "command"):
        assert len(SLOTS[slot]) >= 4
    sents = [sample_sentence(np.random.default_rng([1, i])) for i in range(300)]
    assert sents == [sample_sentence(np.random.default_rng([1, i])) for i in range(300)]
    lengths = {len(s.split()) for s in sents}
    assert lengths == {5, 6, 7, 8}
    assert all(w in VOCABULARY for s in sents for w in s.split())
    assert len(set(sents)) > 290  # varied
    assert all(len(sample_sentence(np.random.default_rng(i), 6, 6).split()) == 6 for i in range(20))
    with pytest.raises(ValueError, match="no sentence template"):
        templates_between(9, 12)


class _Ph:
    def __init__(self, start, end, name):
        self.start_s, self.end_s, self.phoneme = start, end, name


def test_visemes_close_lips_for_bilabials_and_round_for_u():
    # "_ m a: p u: _": silence, lips shut for m, wide open for a:, shut before the p release, rounded for u:
    ph = [_Ph(0.0, 0.2, "_"), _Ph(0.2, 0.32, "m"), _Ph(0.32, 0.6, "'A:"), _Ph(0.6, 0.64, "p"),
          _Ph(0.64, 0.9, "u:"), _Ph(0.9, 1.2, "_")]
    tr = mouth_track(ph, 30, 25, anticipation_ms=0.0)
    f = lambda t: int(t * 25)  # noqa: E731
    assert tr.closure[f(0.26)] == 1.0 and tr.open[f(0.26)] == 0.0  # m
    assert tr.open[f(0.48)] > 0.8  # A:
    assert tr.closure[f(0.58)] > 0.5 and tr.open[f(0.58)] < 0.1  # closure before the p release
    assert tr.spread[f(0.8)] < -0.8 and tr.open[f(0.8)] < 0.3  # u: rounded
    assert tr.open[f(1.1)] < 0.1  # rest
    assert len(viseme_targets("aI")) == 2 and len(viseme_targets("'eI")) == 2
    assert viseme_targets("f") != viseme_targets("s")


def test_generation_is_deterministic_and_independent_of_workers(tmp_path):
    spec = SynthConfig(num=6, seed=11, num_speakers=3)
    a = generate_corpus(tmp_path / "a", spec, workers=1, progress=False)
    b = generate_corpus(tmp_path / "b", spec, workers=2, progress=False)
    for split in ("train.csv", "val.csv", "test.csv"):
        assert (a / split).read_text() == (b / split).read_text()
    rows = read_manifest(a / "train.csv") + read_manifest(a / "val.csv") + read_manifest(a / "test.csv")
    assert len(rows) == 6
    for r in rows:
        assert r.audio_path(a).read_bytes() == r.audio_path(b).read_bytes()
        assert r.video_path(a).read_bytes() == r.video_path(b).read_bytes()
    other = generate_corpus(tmp_path / "c", SynthConfig(num=6, seed=12, num_speakers=3), workers=1, progress=False)
    texts = lambda root: sorted(json.loads(x)["text"] for x in (root / "utterances.jsonl").read_text().splitlines())  # noqa: E731
    assert texts(a) != texts(other)


def test_read_back_frame_counts_and_audio_alignment():
    root = tiny_corpus()
    rows = [r for s in ("train", "val", "test") for r in read_manifest(root / f"{s}.csv")]
    assert len(rows) == TINY["num"]
    durations = []
    for r in rows:
        frames = read_video(r.video_path(root))
        audio = read_audio(r.audio_path(root))
        assert frames.shape == (r.frames, 96, 96) and frames.dtype == np.uint8
        assert len(audio) == 640 * r.frames  # 25 fps, 16 kHz
        assert 5 <= len(r.text.split()) <= 8 and r.text == r.text.lower()
        durations.append(len(audio) / 16000)
    assert 1.3 < np.mean(durations) < 3.5, durations


def test_video_follows_the_audio_in_time():
    """Mouth opening (darker mouth region) rises with speech energy in the same frames, not frames apart."""
    root = tiny_corpus()
    rows = read_manifest(root / "train.csv")
    shifts = (-6, -4, -2, 0, 2, 4, 6)
    corr = {s: [] for s in shifts}
    for r in rows:
        v = read_video(r.video_path(root)).astype(np.float32)
        a = read_audio(r.audio_path(root))
        T = len(v)
        energy = np.log(np.mean(a.reshape(T, 640) ** 2, axis=1) + 1e-6)
        opening = -v[:, 30:75, 20:76].mean(axis=(1, 2))
        for s in shifts:
            x, y = (opening[s:], energy[:T - s]) if s >= 0 else (opening[:T + s], energy[-s:])
            corr[s].append(np.corrcoef(x, y)[0, 1])
    mean = {s: float(np.mean(c)) for c, s in zip(corr.values(), shifts)}
    assert mean[0] > 0.25, mean
    assert all(mean[0] > mean[s] + 0.1 for s in shifts if s != 0), mean


def test_visemes_differ_between_speakers_and_mouth_moves():
    root = tiny_corpus()
    rows = read_manifest(root / "train.csv")
    per_speaker = {}
    for r in rows:
        v = read_video(r.video_path(root)).astype(np.float32)
        assert v[:, 30:75, 20:76].std(axis=0).mean() > 3.0  # the mouth region changes over time
        per_speaker.setdefault(r.rel_path.split("/")[0], v.mean())
    assert len(per_speaker) >= 3 and np.ptp(list(per_speaker.values())) > 5.0  # appearance differs


def test_splits_and_speaker_holdout():
    metas = [{"index": i, "speaker": f"spk{i % 6:02d}", "text": "a b c d e", "frames": 50, "rel_path": f"{i}.mp4"}
             for i in range(120)]
    plain = assign_splits(SynthConfig(num=120, num_speakers=6, val_fraction=0.1, test_fraction=0.2), metas)
    assert [len(plain[s]) for s in ("train", "val", "test")] == [84, 12, 24]
    ids = [m["index"] for s in plain.values() for m in s]
    assert sorted(ids) == list(range(120))
    held = assign_splits(SynthConfig(num=120, num_speakers=6, val_fraction=0.1, holdout_speakers=2), metas)
    test_spk = {m["speaker"] for m in held["test"]}
    assert test_spk == {"spk04", "spk05"} and len(held["test"]) == 40
    assert not test_spk & {m["speaker"] for m in held["train"] + held["val"]}


def test_cli_idempotent_and_resplits(tmp_path, capsys):
    out = tmp_path / "cli"
    main(["--out", str(out), "--num", "5", "--seed", "4", "data.synth.workers=1", "data.synth.num_speakers=2",
          "data.synth.test_fraction=0.2", "data.synth.val_fraction=0.2", "logging.progress=false"])
    assert "corpus:" in capsys.readouterr().out
    marker = read_marker(out)
    assert marker["media"]["num"] == 5 and marker["counts"] == {"train": 3, "val": 1, "test": 1}
    mp4s = sorted(out.glob("synth/*/*.mp4"))
    assert len(mp4s) == 5
    stamps = [p.stat().st_mtime_ns for p in mp4s]
    spec = SynthConfig(num=5, seed=4, num_speakers=2, test_fraction=0.2, val_fraction=0.2)
    generate_corpus(out, spec, workers=1, progress=False)  # complete: nothing regenerated
    assert [p.stat().st_mtime_ns for p in mp4s] == stamps
    generate_corpus(out, SynthConfig(num=5, seed=4, num_speakers=2, test_fraction=0.4, val_fraction=0.2),
                    workers=1, progress=False)  # only the split changed: CSVs rewritten, media kept
    assert read_marker(out)["counts"] == {"train": 2, "val": 1, "test": 2}
    assert [p.stat().st_mtime_ns for p in mp4s] == stamps
    with pytest.raises(FileExistsError, match="--force"):
        generate_corpus(out, SynthConfig(num=5, seed=5, num_speakers=2), workers=1, progress=False)


def test_default_root_in_cache_and_resume(tmp_path):
    from mome.data.synth import ensure_corpus, resolve_data_root

    from mome.config import load_config

    cfg = load_config(None, [f"cache_dir={tmp_path}", "data.synth.num=4", "data.synth.seed=9",
                             "data.synth.num_speakers=2", "data.synth.workers=1", "logging.progress=false",
                             f"data.synth.val_fraction={TINY['val_fraction']}",
                             f"data.synth.test_fraction={TINY['test_fraction']}"])
    root = resolve_data_root(cfg)
    assert root.parent == tmp_path / "synth" and root.name.startswith("n4-s9-")
    # every media setting is part of the folder name: a changed setting never meets a stale corpus
    other = load_config(None, [f"cache_dir={tmp_path}", "data.synth.num=4", "data.synth.seed=9",
                               "data.synth.num_speakers=3"])
    assert resolve_data_root(other) != root
    # an interrupted run: two utterances done, no marker -> the rest is generated, the done ones kept
    spec = SynthConfig(num=4, seed=9, num_speakers=2, val_fraction=TINY["val_fraction"],
                     test_fraction=TINY["test_fraction"])
    generate_corpus(root, spec, workers=1, progress=False)
    (root / "COMPLETE").unlink()
    (root / "GENERATING").write_text(json.dumps({"media": media_key(spec)}))
    victim = sorted(root.glob("synth/*/*.json"))[-1]
    victim.unlink()
    kept = sorted(root.glob("synth/*/*.json"))[0]
    stamp = kept.stat().st_mtime_ns
    assert ensure_corpus(cfg) == root and read_marker(root) is not None
    assert victim.exists() and kept.stat().st_mtime_ns == stamp
    assert not (root / "GENERATING").exists()
    assert session_dir().exists()
