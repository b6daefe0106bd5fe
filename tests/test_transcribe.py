"""Transcribing your own clip: a real face photograph composed into a moving, zooming 29.97 fps video with sound,
read at 25 fps, the mouth found and cropped; clear errors without a face; the transcript equal to evaluate.py's on a
synthetic test clip; audio-only and video-only clips at ASR / VSR scales."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.clip_fixtures import face_photo, moving_face_video, write_clip
from tests.training_fixtures import TINY_EVAL_CORPUS

# the lips in face_photo(), marked by hand (x0, y0, x1, y1): corners of the mouth, top of the upper lip, bottom
# of the lower lip
LIPS = (230, 268, 307, 295)
FPS = 30000 / 1001


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("face")
    frames, places = moving_face_video(60, size=(480, 360))  # 2.0 s at 29.97 fps, moving right and down, zooming in
    audio = (0.1 * np.sin(np.arange(int(16000 * 60 / FPS)) * 0.05)).astype(np.float32)
    return write_clip(d / "face.mp4", frames, fps=FPS, audio=audio), places


def _to_roi(x, y, centre, angle, scale, size=96):
    """Frame pixel -> crop pixel (the inverse of mome.data.mouth.crop_frame's mapping)."""
    dx, dy = x - centre[0], y - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    h = (size - 1) / 2
    return h + scale * (c * dx + s * dy), h + scale * (-s * dx + c * dy)


def test_face_video_gives_aligned_mouth_crops_at_25_fps(face_clip):
    from mome.data.clip import read_clip
    from mome.data.face import FaceLandmarker
    from mome.data.mouth import crop_mouths, crop_params, mouth_rois, smooth_landmarks

    path, places = face_clip
    clip = read_clip(path)
    assert clip.frames.shape == (50, 360, 480) and abs(clip.source_fps - FPS) < 1e-6  # 2.002 s -> 50 frames
    assert abs(len(clip.audio) - 2.002 * 16000) < 0.05 * 16000
    lm = FaceLandmarker()
    rois, pts, found = mouth_rois(clip.frames, lm, path)
    assert rois.shape == (50, 96, 96) and rois.dtype == np.uint8 and found == 50

    centres, angles, scales = crop_params(smooth_landmarks(pts))
    x0, y0, x1, y1 = LIPS
    for k in range(50):
        t = int(round(k / 25 * FPS))  # the source frame nearest to output frame k
        px, py, s = places[min(t, len(places) - 1)]
        centre, angle, scale = centres[k], angles[k], scales[k]
        corners = [_to_roi(px + s * x, py + s * y, centre, angle, scale) for x in (x0, x1) for y in (y0, y1)]
        us, vs = zip(*corners)
        assert min(us) > 4 and max(us) < 91 and min(vs) > 20 and max(vs) < 76, (k, corners)  # lips inside the crop
        u, v = _to_roi(px + s * (x0 + x1) / 2, py + s * (y0 + y1) / 2, centre, angle, scale)
        assert abs(u - 47.5) < 6 and abs(v - 47.5) < 6, (k, u, v)  # and in its middle
        assert 0.4 < (max(us) - min(us)) / 96 < 0.9  # the mouth spans about 2/3 of the width at every zoom

    # the crops look like the mouth crop of the still photograph (at the video's size), not like its eyes
    from PIL import Image

    from mome.data.mouth import crop_frame

    photo = np.asarray(Image.fromarray(face_photo()).resize((256, 300), Image.BILINEAR))
    grey = np.rint(photo @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    p = lm(grey)
    ref = crop_mouths(grey[None], p[None], smooth=0)[0]
    _, angle, scale = crop_params(p[None])
    eyes = crop_frame(grey, tuple(p[36:48].mean(0)), float(angle[0]), float(scale[0]))

    def ncc(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        return float(np.mean((a - a.mean()) / a.std() * (b - b.mean()) / b.std()))

    mouth_ncc = [ncc(ref, r) for r in rois]
    eyes_ncc = [ncc(eyes, r) for r in rois]
    assert np.mean(mouth_ncc) > 0.85 and min(mouth_ncc) > 0.5, mouth_ncc
    assert max(eyes_ncc) < 0.35, eyes_ncc


def test_no_face_is_a_clear_error_naming_file_and_frames(tmp_path):
    from mome.data.face import FaceLandmarker
    from mome.data.mouth import NoFaceError, mouth_rois
    from mome.transcribe import main

    rng = np.random.default_rng(0)
    blank = np.clip(rng.normal(120, 20, (30, 120, 160, 3)), 0, 255).astype(np.uint8)
    path = write_clip(tmp_path / "noface.mp4", blank, fps=25)
    with pytest.raises(NoFaceError, match=r"noface\.mp4: no face found in any of its 30 frames \(frames 0-29\)"):
        mouth_rois(blank[..., 0], FaceLandmarker(), path)
    frames, _ = moving_face_video(60, size=(320, 240), start=(20, 0, 0.35), end=(60, 10, 0.38))
    grey = frames[..., 1].copy()
    grey[10:46] = 90  # the face gone for 36 frames (1.44 s)
    with pytest.raises(NoFaceError, match=r"gap\.mp4: no face found in frames 10-45 \(0\.40-1\.84 s"):
        mouth_rois(grey, FaceLandmarker(), tmp_path / "gap.mp4")
    with pytest.raises(SystemExit, match=r"transcribe: .*no_model: no such run or checkpoint folder"):
        main([str(path), "--checkpoint", str(tmp_path / "no_model")])


# ---- with a model -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """A tiny random MoME over ASR, VSR and AVSR, saved as a run checkpoint, and its synthetic corpus."""
    from mome.data.synth import ensure_corpus
    from mome.models import build_model
    from mome.models.tiny import tiny_config

    root = tmp_path_factory.mktemp("transcribe")
    cfg = tiny_config(root / "backbones", "mome", [*TINY_EVAL_CORPUS, f"output_dir={root / 'runs'}",
                                                   "model.tasks=[asr,vsr,avsr]"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ckpt = root / "runs" / "tiny" / "checkpoints" / "step_0000001"
    model.save_pretrained(ckpt, run_config=cfg)
    (ckpt / "COMPLETE").write_text("1\n")
    return root, ckpt.parent.parent, Path(ensure_corpus(cfg))


def test_transcript_equals_evaluate_on_a_synthetic_test_clip(model_run, capsys):
    from mome.data.manifest import read_manifest
    from mome.evaluation.run import main as evaluate_main
    from mome.transcribe import main, one_line

    root, run, corpus = model_run
    row = read_manifest(corpus / "test.csv")[0]
    out = root / "eval"
    evaluate_main(["--checkpoint", str(run), "--out", str(out), "eval.snrs=[clean]", "eval.judge=false",
                   "eval.latency=false", "eval.max_utterances=1", "eval.scales=[avsr:4x2,vsr:5]"])
    expected = {}
    for scale in ("avsr-4x2", "vsr-5"):
        (line,) = (out / "hypotheses" / "tiny" / f"{scale}__snr_clean.jsonl").read_text().splitlines()
        rec = json.loads(line)
        assert rec["id"] == row.utt_id
        expected[rec["scale"]] = rec["hyp"]
    capsys.readouterr()
    results = main([str(row.video_path(corpus)), "--checkpoint", str(run), "--scale", "avsr:4x2,vsr:5"])
    assert {r.scale: r.text for r in results} == expected
    printed = capsys.readouterr()
    assert "mouth region given" in printed.err and "audio from" in printed.err  # 96x96: no face detection
    for scale, text in expected.items():
        assert re.search(rf"^{scale} +{re.escape(one_line(text))}  \(\d+\.\d\d s\)$", printed.out, re.M), printed.out

    # the same input tensors as the evaluation loader's for that utterance (so any model decodes them alike)
    from mome.config import load_config
    from mome.data.dataset import build_dataset
    from mome.transcribe import Transcriber

    sample = build_dataset(load_config(run / "checkpoints" / "step_0000001" / "config.yaml"), "test", train=False)[0]
    batch = Transcriber(run).prepare(row.video_path(corpus)).batch
    assert sample["id"] == row.utt_id
    assert torch.equal(batch["video"][0], sample["video"]) and torch.equal(batch["audio"][0], sample["audio"])

    results = main([str(row.video_path(corpus)), "--checkpoint", str(run), "--scale", "all"])
    assert [r.scale for r in results] == ["asr:4", "asr:16", "vsr:2", "vsr:5", "avsr:4x2", "avsr:4x5", "avsr:16x2",
                                          "avsr:16x5"]


def test_face_clip_audio_only_and_video_only(model_run, face_clip, tmp_path):
    import soundfile as sf

    from mome.transcribe import TranscribeError, Transcriber, main

    _, run, _ = model_run
    path, _ = face_clip
    tr = Transcriber(run)
    clip = tr.prepare(path)
    assert clip.has_audio and clip.has_video and "face found in 50/50 frames" in clip.notes
    assert tuple(clip.batch["video"].shape) == (1, 50, 1, 88, 88) and clip.batch["audio"].shape[1] == 50 * 640
    assert "video resampled from 29.970 to 25 fps" in clip.notes
    assert [r.scale for r in tr(path, "avsr:16x5", prepared=clip)] == ["avsr:16x5"]

    wav = tmp_path / "speech.wav"
    sf.write(str(wav), (0.1 * np.sin(np.arange(24000) * 0.03)).astype(np.float32), 16000)
    assert [r.scale for r in tr(wav, "all")] == ["asr:4", "asr:16"]
    with pytest.raises(TranscribeError, match=r"speech\.wav: scale 'avsr:4x2' needs video, but the clip has only "
                                              r"audio"):
        tr(wav, "avsr:4x2")
    blank = np.full((20, 120, 160, 3), 100, np.uint8)
    noface = write_clip(tmp_path / "noface.mp4", blank, fps=25, audio=np.zeros(12800, np.float32))
    with pytest.raises(SystemExit, match=r"^transcribe: .*noface\.mp4: no face found in any of its 20 frames"):
        main([str(noface), "--checkpoint", str(run), "--scale", "avsr:4x2"])
    frames, _ = moving_face_video(30, size=(320, 240), start=(20, 0, 0.35), end=(40, 5, 0.36))
    silent = write_clip(tmp_path / "silent.mp4", frames, fps=15)  # no soundtrack, 15 fps: frames repeated
    prepared = tr.prepare(silent)
    assert not prepared.has_audio and prepared.batch["video"].shape[1] == 50
    assert [r.scale for r in tr(silent, "all", prepared=prepared)] == ["vsr:2", "vsr:5"]
