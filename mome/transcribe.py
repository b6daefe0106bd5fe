"""Transcribe your own clip with a trained model, at one scale or at every scale.

    python -m mome.transcribe clip.mp4 --checkpoint runs/demo --scale avsr:4x2
    python -m mome.transcribe clip.mp4 --checkpoint runs/demo --scale all
    python -m mome.transcribe talk.wav --checkpoint runs/asr_model --scale asr:4     # audio only: ASR scales
    python -m mome.transcribe mouth.mp4 --checkpoint runs/demo --roi                 # already a 96x96 mouth crop

The clip can be any size and frame rate with a face somewhere in the frame (``mome.data.clip`` reads it at 25 fps
and 16 kHz mono). Unless the clip is already a mouth region (``--roi``; a 96x96 clip counts as one unless ``--face``
is given), the face and its 68 landmarks are found in every frame (``mome.data.face``) and the mouth is cropped
and aligned to 96x96 (``mome.data.mouth``). The clip then goes through the evaluation transforms of the model's
config and is decoded by the evaluation's own decoder (``mome.evaluation.decode.decode_loader``) with the
checkpoint's ``eval`` decoding settings (beam size, length; ``key=value`` overrides change them), so a clip of the
synthetic test split gets the transcript ``evaluate.py`` gives it at the same scale. A checkpoint is a run folder,
a checkpoint folder or an exported model folder (``mome.export``). No face: a ``NoFaceError`` naming the file and
the frames, never an empty transcript.

API::

    from mome.transcribe import Transcriber
    tr = Transcriber("runs/demo")
    for result in tr("clip.mp4", scales="all"):
        print(result.scale, result.text)
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from mome.data.media import BadInputError
from mome.data.mouth import ROI_SIZE, is_mouth_roi
from mome.scales import Scale



class TranscribeError(ValueError):
    """The clip, the scale and the model do not fit together; the message says which."""


@dataclass
class Transcript:
    scale: str
    text: str
    seconds: float  # encoding + decoding at this scale


@dataclass
class PreparedClip:
    path: Path
    batch: Dict  # one-utterance batch, as the evaluation loader makes it
    duration: float
    has_audio: bool
    has_video: bool
    timings: Dict[str, float] = field(default_factory=dict)  # read, face, crop (seconds)
    notes: List[str] = field(default_factory=list)


def _resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames])


def prepare_clip(path, cfg, roi: Optional[bool] = None, landmarker=None, max_gap: int = 25) -> PreparedClip:
    """Read, find the mouth (unless ``roi``), transform: the one-utterance batch of a clip for ``cfg``'s model."""
    from mome.data.clip import read_clip
    from mome.data.dataset import SAMPLES_PER_FRAME, collate_batch
    from mome.data.media import FPS, align_audio, read_video
    from mome.data.transforms import AudioTransform, VideoTransform

    path = Path(path)
    fps, sr = int(cfg.data.fps), int(cfg.data.sample_rate)
    timings: Dict[str, float] = {}
    notes: List[str] = []
    t0 = time.perf_counter()
    clip = read_clip(path, fps=fps, sample_rate=sr)
    frames = clip.frames
    if frames is not None and clip.source_fps and round(clip.source_fps, 3) == fps == FPS and is_mouth_roi(frames) \
            and roi is not False:
        frames = read_video(path)  # exactly the frames the dataset loader reads
    timings["read"] = time.perf_counter() - t0
    if clip.source_fps and abs(clip.source_fps - fps) > 1e-3:
        notes.append(f"video resampled from {clip.source_fps:.3f} to {fps} fps")
    if clip.audio_source and Path(clip.audio_source) != path:
        notes.append(f"audio from {clip.audio_source}")
    if frames is not None:
        as_roi = is_mouth_roi(frames) if roi is None else roi
        if as_roi:
            if not is_mouth_roi(frames):
                frames = _resize_frames(frames, ROI_SIZE)
                notes.append(f"--roi: frames resized to {ROI_SIZE}x{ROI_SIZE}")
            notes.append("mouth region given (no face detection)")
        else:
            from mome.data.face import FaceLandmarker
            from mome.data.mouth import crop_mouths, fill_gaps

            lm = landmarker or FaceLandmarker()
            t0 = time.perf_counter()
            found = [lm(f) for f in frames]
            timings["face"] = time.perf_counter() - t0
            pts = fill_gaps(found, path, fps=fps, max_gap=max_gap)
            t0 = time.perf_counter()
            frames = crop_mouths(frames, pts)
            timings["crop"] = time.perf_counter() - t0
            n = sum(p is not None for p in found)
            notes.append(f"face found in {n}/{len(found)} frames")
    tcfg = cfg.data.transforms
    uid = path.stem
    rng = np.random.default_rng(0)  # evaluation transforms draw nothing
    audio = clip.audio
    if audio is not None and frames is not None:
        audio, _ = align_audio(audio, len(frames), clip.audio_source or path, SAMPLES_PER_FRAME)
    sample = {"id": uid, "text": ""}
    if audio is not None:
        sample["audio"] = AudioTransform(tcfg, train=False)(audio, uid, rng)
    if frames is not None:
        sample["video"] = VideoTransform(tcfg, train=False)(frames, rng)
    if audio is not None and frames is not None:
        batch = collate_batch([sample])
    else:  # one modality: the same tensors, without the missing one
        batch = {"ids": [uid], "text": [""]}
        for key in ("audio", "video"):
            if key in sample:
                batch[key] = sample[key].unsqueeze(0)
                batch[f"{key}_lengths"] = torch.tensor([sample[key].shape[0]], dtype=torch.long)
    return PreparedClip(path, batch, clip.duration, audio is not None, frames is not None, timings, notes)


def one_line(text: str) -> str:
    """A transcript for the terminal: line breaks shown as spaces (the words are the same)."""
    return " ".join(text.splitlines())


def choose_scales(model_scales: Sequence[Scale], requested: Sequence[str] | str, has_audio: bool, has_video: bool,
                  path) -> List[Scale]:
    """The scales to decode: ``all`` (every model scale the clip's streams allow) or the named ones."""
    usable = [s for s in model_scales if (has_audio or not s.uses_audio) and (has_video or not s.uses_video)]
    names = [requested] if isinstance(requested, str) else list(requested)
    names = [n.strip() for name in names for n in name.split(",") if n.strip()] or ["all"]
    have = f"{'audio' if has_audio else ''}{' and ' if has_audio and has_video else ''}{'video' if has_video else ''}"
    if names == ["all"]:
        if not usable:
            raise TranscribeError(f"{path}: the clip has only {have}; this model's scales "
                                  f"({', '.join(map(str, model_scales))}) all need more")
        return usable
    out = []
    for name in names:
        try:
            s = Scale.parse(name)
        except ValueError as exc:
            raise TranscribeError(str(exc)) from None
        if s not in model_scales:
            raise TranscribeError(f"scale '{s}' is not trained by this model; it has "
                                  f"{', '.join(map(str, model_scales))}")
        if s not in usable:
            need = "audio" if s.uses_audio and not has_audio else "video"
            raise TranscribeError(f"{path}: scale '{s}' needs {need}, but the clip has only {have}; "
                                  f"choose one of {', '.join(map(str, usable)) or '(none)'}")
        out.append(s)
    return out


class Transcriber:
    """A loaded model that transcribes clips (see the module docstring)."""

    def __init__(self, checkpoint, overrides: Sequence[str] = (), device: Optional[str] = None,
                 detector: str = "hog"):
        from mome.models.checkpoints import load_model

        self.cfg, self.model = load_model(checkpoint, overrides=list(overrides))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.detector = detector
        self._landmarker = None

    @property
    def landmarker(self):
        if self._landmarker is None:
            from mome.data.face import FaceLandmarker

            self._landmarker = FaceLandmarker(self.detector)
        return self._landmarker

    def prepare(self, path, roi: Optional[bool] = None) -> PreparedClip:
        # the detector loads on first use: a mouth-region clip never needs it
        return prepare_clip(path, self.cfg, roi=roi, landmarker=lambda frame: self.landmarker(frame))

    def __call__(self, path, scales: Sequence[str] | str = "all", roi: Optional[bool] = None,
                 prepared: Optional[PreparedClip] = None) -> List[Transcript]:
        from mome.evaluation.decode import decode_loader

        clip = prepared or self.prepare(path, roi=roi)
        chosen = choose_scales(self.model.scales, scales, clip.has_audio, clip.has_video, clip.path)
        e = self.cfg.eval
        out = []
        for s in chosen:
            t0 = time.perf_counter()
            hyps = decode_loader(self.model, [clip.batch], [s], num_beams=e.num_beams, max_new_tokens=e.max_new_tokens,
                                 do_sample=e.do_sample, seed=e.seed, progress=False)
            out.append(Transcript(s.name, hyps[s.name][0][2], time.perf_counter() - t0))
        return out


def transcribe(path, checkpoint, scales: Sequence[str] | str = "all", roi: Optional[bool] = None,
               overrides: Sequence[str] = ()) -> List[Transcript]:
    """One clip, one call: load the model of ``checkpoint`` and transcribe ``path`` at ``scales``."""
    return Transcriber(checkpoint, overrides)(path, scales=scales, roi=roi)


def main(argv: Optional[Sequence[str]] = None) -> List[Transcript]:
    import argparse

    from mome.config import ConfigError, parse_overrides
    from mome.data.face import FaceModelsMissing
    from mome.data.mouth import NoFaceError

    p = argparse.ArgumentParser(description="Transcribe a clip (video with sound, audio only or video only).")
    p.add_argument("clip", help="video or audio file")
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or exported model folder")
    p.add_argument("--scale", action="append", default=[], help="e.g. avsr:4x2 (repeat, or comma-separated); "
                                                                "'all' (default): every scale the clip allows")
    roi = p.add_mutually_exclusive_group()
    roi.add_argument("--roi", dest="roi", action="store_true", default=None,
                     help="the clip is already a mouth region: skip face detection (resized to 96x96)")
    roi.add_argument("--face", dest="roi", action="store_false",
                     help="find the face even in a 96x96 clip")
    p.add_argument("--detector", default="hog", choices=("hog", "cnn"), help="dlib face detector (default hog)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.num_beams=1")
    args = p.parse_intermixed_args(argv)
    try:
        t0 = time.perf_counter()
        tr = Transcriber(args.checkpoint, parse_overrides(args.overrides), detector=args.detector)
        load_s = time.perf_counter() - t0
        clip = tr.prepare(args.clip, roi=args.roi)
        results = tr(args.clip, scales=args.scale or "all", prepared=clip)
    except (TranscribeError, NoFaceError, BadInputError, FaceModelsMissing, ConfigError, FileNotFoundError) as exc:
        raise SystemExit(f"transcribe: {exc}") from None
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in clip.timings.items())
    print(f"# {clip.path} ({clip.duration:.2f} s; {'; '.join(clip.notes) or 'as given'}); model loaded in "
          f"{load_s:.1f} s; {steps}", file=sys.stderr)
    width = max(len(r.scale) for r in results)
    for r in results:
        print(f"{r.scale:<{width}}  {one_line(r.text)}  ({r.seconds:.2f} s)")
    return results


if __name__ == "__main__":
    main()
