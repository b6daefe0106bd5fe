"""Bad input: a clear error naming the file and the problem, or with skip_bad a counted, reported skip."""
import logging
import os
import shutil

import av
import numpy as np
import pytest
import soundfile as sf

from mome.data import BadInputError, build_dataloader, build_dataset
from mome.data.manifest import read_manifest, write_manifest
from mome.data.media import read_audio
from tests.data_fixtures import data_config, tiny_corpus


@pytest.fixture()
def corpus(tmp_path):
    """A private copy of the tiny corpus (its train split) whose files the tests may break."""
    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus(), root, ignore=shutil.ignore_patterns(".lock"))
    return root


def _rows(root):
    return read_manifest(root / "train.csv")


def _config(root, *extra):
    return data_config(root, "data.test_csv=bad.csv", 'data.transforms.train_snrs=["clean"]', *extra)


def _empty_mp4(path):
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 96
        s.pix_fmt = "yuv420p"
        c.start_encoding()


def _break(root, case):
    """Break the first training utterance in one way; returns (csv rows, the file the error must name, phrase)."""
    rows = _rows(root)
    r = rows[0]
    video, audio = r.video_path(root), r.audio_path(root)
    if case == "missing":
        video.unlink()
        return rows, video, "video file is missing"
    if case == "missing_audio":
        audio.unlink()
        return rows, audio, "audio file is missing"
    if case == "empty":
        video.write_bytes(b"")
        return rows, video, "empty (0 bytes)"
    if case == "truncated":
        data = video.read_bytes()
        video.write_bytes(data[: len(data) // 2])
        return rows, video, "truncated"
    if case == "truncated_frames":  # a complete file that lost its second half of frames
        from mome.data.media import read_video, write_video

        frames = read_video(video)
        write_video(video, frames[: len(frames) // 2])
        return rows, video, "truncated"
    if case == "undecodable":
        video.write_bytes(os.urandom(4000))
        return rows, video, "cannot decode video"
    if case == "undecodable_audio":
        audio.write_bytes(b"RIFF" + os.urandom(3000))
        return rows, audio, "cannot decode audio"
    if case == "no_frames":
        _empty_mp4(video)
        return rows, video, "no video frames"
    if case == "short_audio":
        a = read_audio(audio)
        sf.write(str(audio), a[: len(a) // 3], 16000, subtype="PCM_16")
        return rows, audio, "audio is much shorter than the video"
    if case == "empty_transcript":
        rows[0] = type(r)(r.dataset, r.rel_path, r.frames, r.extra, "")
        return rows, video, "empty transcript"
    raise AssertionError(case)


CASES = ["missing", "missing_audio", "empty", "truncated", "truncated_frames", "undecodable", "undecodable_audio",
         "no_frames", "short_audio", "empty_transcript"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_a_clear_error(corpus, case):
    rows, path, phrase = _break(corpus, case)
    write_manifest(corpus / "bad.csv", rows[:4])
    with pytest.raises(BadInputError) as info:
        loader = build_dataloader(_config(corpus), "test", train=False)
        for _ in loader:
            pass
    msg = str(info.value)
    assert str(path) in msg and phrase in msg, msg


@pytest.mark.parametrize("case", CASES)
def test_skip_bad_counts_and_reports(corpus, case, caplog):
    rows, path, _ = _break(corpus, case)
    write_manifest(corpus / "bad.csv", rows[:4])
    cfg = _config(corpus, "data.skip_bad=true", "data.max_frames_eval=100")  # about one utterance per batch
    loader = build_dataloader(cfg, "test", train=False)
    with caplog.at_level(logging.WARNING, logger="mome.data"):
        ids = [i for batch in loader for i in batch["ids"]]
    assert sorted(ids) == sorted(r.utt_id for r in rows[1:4])  # the three good ones, each once
    assert loader.dataset.bad_count() == 1
    assert str(path) in caplog.text and "skip" in caplog.text
    assert "bad utterances" in caplog.text  # the count at the end of the epoch (or at start for cheap checks)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mome.data"):
        again = [i for batch in loader for i in batch["ids"]]
    assert sorted(again) == sorted(ids) and loader.dataset.bad_count() == 1
    if case in ("missing", "missing_audio", "empty", "empty_transcript"):
        assert str(path) not in caplog.text  # left out when the dataset was built
    else:
        assert "skipped 1 bad utterances this epoch" in caplog.text and str(path) in caplog.text  # every epoch


def test_error_from_a_worker_process_names_the_file(corpus):
    rows, path, phrase = _break(corpus, "undecodable")
    write_manifest(corpus / "bad.csv", rows[:3])
    loader = build_dataloader(_config(corpus, "data.num_workers=2"), "test", train=False)
    with pytest.raises(Exception) as info:
        for _ in loader:
            pass
    assert str(path) in str(info.value) and phrase in str(info.value)


def test_skip_bad_with_workers_reports_at_epoch_end(corpus, caplog):
    rows, path, _ = _break(corpus, "short_audio")
    write_manifest(corpus / "bad.csv", rows[:5])
    loader = build_dataloader(_config(corpus, "data.num_workers=2", "data.skip_bad=true"), "test", train=False)
    with caplog.at_level(logging.WARNING, logger="mome.data"):
        ids = [i for batch in loader for i in batch["ids"]]
    assert len(ids) == 4 and loader.dataset.bad_count() == 1
    assert "skipped 1 bad utterances this epoch" in caplog.text and str(path) in caplog.text


def test_audio_slightly_short_is_padded_not_rejected(corpus):
    r = _rows(corpus)[0]
    a = read_audio(r.audio_path(corpus))
    sf.write(str(r.audio_path(corpus)), a[:-700], 16000, subtype="PCM_16")  # about one frame short
    ds = build_dataset(_config(corpus, "data.test_csv=train.csv"), "test", train=False)
    frames, audio = ds.load(0)
    assert len(audio) == 640 * len(frames) and np.all(audio[-700:] == 0)
