"""Preparing a dataset: a folder of ordinary clips with transcripts beside them becomes the auto_avsr layout,
in parallel and resumably, with unusable clips skipped and listed; train.py then trains on it. LRS2 / LRS3 folder
layouts give their splits."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.clip_fixtures import moving_face_video, write_clip
from tests.training_fixtures import reset_accelerate, tiny_train_config

WORDS = "bin blue at f two now lay green with s nine soon place red by r one again set white in o six please".split()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """10 usable face clips (different sizes, frame rates, placements) with transcripts, plus 3 unusable ones."""
    src = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    sizes = [(320, 240), (360, 270), (400, 300)]
    rates = [25, 30000 / 1001, 24]
    for i in range(10):
        n = 36 + 3 * i
        frames, _ = moving_face_video(n, size=sizes[i % 3], start=(10 + 4 * i, 0, 0.33), end=(30 + 3 * i, 8, 0.36))
        fps = rates[i % 3]
        audio = (0.1 * np.sin(np.arange(int(16000 * n / fps)) * (0.02 + 0.003 * i))).astype(np.float32)
        sub = src / ("speaker_a" if i < 5 else "speaker_b")
        sub.mkdir(exist_ok=True)
        write_clip(sub / f"clip{i:02d}.mp4", frames, fps=fps, audio=audio)
        words = " ".join(rng.choice(WORDS, 4))
        (sub / f"clip{i:02d}.txt").write_text(words.upper() + "\n")
    # unusable: no transcript, no face, not a video
    frames, _ = moving_face_video(30, size=(320, 240), start=(10, 0, 0.33), end=(20, 0, 0.33))
    write_clip(src / "no_transcript.mp4", frames, fps=25, audio=np.zeros(19200, np.float32))
    write_clip(src / "no_face.mp4", np.full((30, 120, 160, 3), 90, np.uint8), fps=25, audio=np.zeros(19200, np.float32))
    (src / "no_face.txt").write_text("nobody here\n")
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    (src / "broken.txt").write_text("broken clip\n")
    return src


def test_folder_of_clips_to_layout_resumes_and_trains(source, tmp_path):
    from mome.data.manifest import read_manifest
    from mome.data.media import read_audio, read_video
    from mome.data.prepare import LOG, main

    out = tmp_path / "prepared"
    summary = main([str(source), str(out), "--workers", "2", "--val-fraction", "0.2", "--test-fraction", "0.2"])
    assert summary["clips"] == 13 and summary["processed"] == 13 and summary["skipped"] == 3
    splits = summary["splits"]
    assert sum(splits.values()) == 10 and splits["train"] > 0
    with (out / "skipped.csv").open() as f:
        skipped = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f)}
    assert set(skipped) == {"no_transcript.mp4", "no_face.mp4", "broken.mp4"}
    assert "no transcript" in skipped["no_transcript.mp4"] and "no face found" in skipped["no_face.mp4"]
    assert "cannot decode" in skipped["broken.mp4"] or "truncated" in skipped["broken.mp4"]
    rows = [r for s in ("train", "val", "test") for r in read_manifest(out / f"{s}.csv")]
    assert len(rows) == 10 and {r.dataset for r in rows} == {source.name}
    for r in rows:
        v = read_video(r.video_path(out))
        assert v.shape[1:] == (96, 96) and abs(len(v) - r.frames) <= 1
        assert len(read_audio(r.audio_path(out))) == 640 * r.frames
        assert r.text == r.text.lower() and len(r.text.split()) == 4 == int(r.extra)
    clip05 = next(r for r in rows if r.rel_path.endswith("clip05.mp4"))  # 51 frames at 24 fps: 2.125 s
    assert clip05.frames == 53 and clip05.rel_path == "speaker_b/clip05.mp4"

    # a second run resumes: nothing is processed again, the outputs are the same
    mtime = clip05.video_path(out).stat().st_mtime_ns
    again = main([str(source), str(out), "--workers", "2", "--val-fraction", "0.2", "--test-fraction", "0.2"])
    assert again["processed"] == 0 and again["resumed"] == 13 and again["splits"] == splits
    assert clip05.video_path(out).stat().st_mtime_ns == mtime
    assert len((out / LOG).read_text().splitlines()) == 13
    clip05.video_path(out).unlink()  # a lost output is made again
    assert main([str(source), str(out), "--workers", "1", "--val-fraction", "0.2",
                 "--test-fraction", "0.2"])["processed"] == 1

    # train.py trains on the layout for a few steps
    from mome.training.trainer import train

    base = tmp_path / "train"
    cfg = tiny_train_config(base, "own_data", "data.dataset=lrs", f"data.root={out}", "train.max_steps=3",
                            "train.val_every=0", "train.save_every=0", "data.noise.babble_speakers=3",
                            "train.epochs=3")
    reset_accelerate()
    try:
        rdir = train(cfg)
    finally:
        reset_accelerate()
    import json

    steps = [json.loads(line) for line in (rdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in steps if r.get("split", "train") == "train" and "loss" in r]
    assert [r["step"] for r in train_steps][-1] == 3 and all(np.isfinite(r["loss"]) for r in train_steps)


def _lrs_txt(text: str) -> str:
    return f"Text:  {text}\nConf:  3\n\nWORD START END ASDSCORE\n{text.split()[0]} 0.10 0.40 1.0\n"


def test_lrs3_and_lrs2_layouts(source, tmp_path):
    from mome.data.manifest import read_manifest
    from mome.data.prepare import find_items, prepare

    clips = sorted(source.glob("speaker_*/clip*.mp4"))
    lrs3 = tmp_path / "LRS3"
    for folder, spk, clip in (("trainval", "00j9bKdiOjk", clips[0]), ("trainval", "0akiEFwtkyA", clips[1]),
                              ("test", "0Fi83BHQsMA", clips[2]), ("pretrain", "0af00UcTOSc", clips[3])):
        (lrs3 / folder / spk).mkdir(parents=True)
        shutil.copy(clip, lrs3 / folder / spk / "50001.mp4")
        (lrs3 / folder / spk / "50001.txt").write_text(_lrs_txt("AND SO IT BEGAN"))
    layout, items = find_items(lrs3, val_fraction=0.0)
    assert layout == "lrs3" and sorted((i.rel, i.split) for i in items) == [
        ("test/0Fi83BHQsMA/50001", "test"), ("trainval/00j9bKdiOjk/50001", "train"),
        ("trainval/0akiEFwtkyA/50001", "train")]
    assert {i.text for i in items} == {"AND SO IT BEGAN"}
    assert len(find_items(lrs3, pretrain=True)[1]) == 4
    summary = prepare(lrs3, tmp_path / "lrs3_out", workers=1, val_fraction=0.0, progress=False)
    assert summary["dataset"] == "lrs3" and summary["splits"] == {"train": 2, "val": 0, "test": 1}
    (row,) = read_manifest(tmp_path / "lrs3_out" / "test.csv")
    assert (row.dataset, row.rel_path, row.text) == ("lrs3", "test/0Fi83BHQsMA/50001.mp4", "and so it began")

    lrs2 = tmp_path / "LRS2"
    for k, (split, vid) in enumerate((("train", "5535415699068794046/00001"), ("val", "6330311066473698535/00011"),
                                      ("test", "6300370419826092098/00002"))):
        (lrs2 / "main" / vid).parent.mkdir(parents=True)
        shutil.copy(clips[k], lrs2 / "main" / f"{vid}.mp4")
        (lrs2 / "main" / f"{vid}.txt").write_text(_lrs_txt("WE WENT HOME"))
        (lrs2 / f"{split}.txt").write_text(vid + (" NF" if split == "test" else "") + "\n")
    layout, items = find_items(lrs2)
    assert layout == "lrs2" and sorted((i.rel, i.split) for i in items) == [
        ("main/5535415699068794046/00001", "train"), ("main/6300370419826092098/00002", "test"),
        ("main/6330311066473698535/00011", "val")]


def test_csv_source_and_bad_sources(source, tmp_path):
    from mome.data.prepare import PrepareError, find_items

    table = tmp_path / "clips.csv"
    table.write_text("path,text,split\nspeaker_a/clip00.mp4,Hello There,test\nspeaker_a/clip01.mp4,general kenobi,\n")
    layout, items = find_items(source, table)
    assert layout == "csv" and [(i.rel, i.split, i.text) for i in items][0] == ("speaker_a/clip00", "test",
                                                                                "Hello There")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,words\nx.mp4,hi\n")
    with pytest.raises(PrepareError, match=r"bad\.csv: needs a header with the columns path,text"):
        find_items(source, bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match=r"empty: no video clips found"):
        find_items(tmp_path / "empty")
