"""Reading an ordinary clip (any container, size and frame rate; video, audio or both) into the model's rates:
grey (BT.601 luminance) frames at 25 fps and a 16 kHz mono waveform.

Frame rate: output frame ``k`` (time ``k / fps``) is the decoded frame whose timestamp is nearest to it, so a 30 or
29.97 fps clip drops frames evenly and a 15 fps clip repeats them; the clip keeps its duration
(``round(duration * fps)`` frames). Audio: every channel averaged, resampled, and shifted so sample 0 is at the
first video frame's time. A video without a soundtrack takes the ``.wav`` beside it (the auto_avsr layout), if
there is one. Audio files that soundfile reads (wav, flac, ogg) are read exactly as the dataset loader reads them.
Every problem is a ``BadInputError`` naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from mome.data.media import FPS, SAMPLE_RATE, BadInputError, _first_line, audio_path_for, luminance, read_audio


@dataclass
class Clip:
    path: Path
    frames: Optional[np.ndarray]  # uint8 [T, H, W] at ``fps``, or None (no video stream)
    audio: Optional[np.ndarray]  # float32 [N] at ``sample_rate``, or None (no audio)
    source_fps: Optional[float]  # the video stream's average frame rate
    audio_source: Optional[str] = None  # where the audio came from (the clip itself or the wav beside it)
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        if self.frames is not None:
            return len(self.frames) / self.fps
        return len(self.audio) / self.sample_rate if self.audio is not None else 0.0


def resample_times(times: List[float], num_out: int, fps: float) -> np.ndarray:
    """Index of the source frame nearest in time to each output frame ``k / fps`` (times relative to the first)."""
    t = np.asarray(times, np.float64)
    out = np.arange(num_out) / fps
    idx = np.clip(np.searchsorted(t, out), 1, len(t) - 1) if len(t) > 1 else np.zeros(num_out, np.int64)
    if len(t) > 1:
        idx = np.where(np.abs(out - t[idx - 1]) <= np.abs(t[idx] - out), idx - 1, idx)
    return idx.astype(np.int64)


def _read_video_stream(container, path: Path, fps: int):
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    frames, times = [], []
    rate = float(stream.average_rate) if stream.average_rate else None
    for i, frame in enumerate(container.decode(stream)):
        times.append(float(frame.time) if frame.time is not None else i / (rate or fps))
        frames.append(luminance(frame.to_ndarray(format="rgb24")))
    if not frames:
        raise BadInputError(path, "video stream has no frames", "no_frames")
    order = np.argsort(times, kind="stable")  # presentation order
    times = [times[i] for i in order]
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / (rate or fps)
    rate = rate or 1.0 / step
    start = times[0]
    rel = [t - start for t in times]
    num_out = max(1, int(round((rel[-1] + step) * fps)))
    picked = resample_times(rel, num_out, fps)
    stack = np.stack([frames[order[i]] for i in picked])
    return stack, rate, start


def _read_audio_stream(container, path: Path, sample_rate: int, start: float) -> Optional[np.ndarray]:
    import av

    if not container.streams.audio:
        return None
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks, first = [], None
    for frame in container.decode(stream):
        if first is None and frame.time is not None:
            first = float(frame.time)
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
        chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        return None
    audio = np.concatenate(chunks).astype(np.float32)
    shift = int(round(((first or 0.0) - start) * sample_rate))  # audio starting later than the video: pad
    audio = np.concatenate([np.zeros(shift, np.float32), audio]) if shift > 0 else audio[-shift:]
    if not np.all(np.isfinite(audio)):
        raise BadInputError(path, "audio contains NaN or infinite samples", "undecodable")
    return audio


def read_clip(path: str | os.PathLike, fps: int = FPS, sample_rate: int = SAMPLE_RATE) -> Clip:
    """The clip's frames at ``fps`` (grey) and audio at ``sample_rate`` (mono); either may be missing."""
    import av

    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "clip file is missing", "missing")
    if path.stat().st_size == 0:
        raise BadInputError(path, "clip file is empty (0 bytes)", "empty_file")
    if path.suffix.lower() in (".wav", ".flac", ".ogg"):
        return Clip(path, None, read_audio(path, sample_rate), None, str(path), fps, sample_rate)
    try:
        with av.open(str(path)) as container:
            frames = rate = None
            start = 0.0
            if container.streams.video:
                frames, rate, start = _read_video_stream(container, path, fps)
            container.seek(0)
            audio = _read_audio_stream(container, path, sample_rate, start)
    except BadInputError:
        raise
    except Exception as exc:  # PyAV's errors carry ffmpeg's complaint
        raise BadInputError(path, f"cannot decode the clip ({_first_line(exc)})", "undecodable") from None
    source = str(path) if audio is not None else None
    beside = audio_path_for(path)
    if audio is None and frames is not None and beside != path and beside.is_file():
        audio, source = read_audio(beside, sample_rate), str(beside)
    if frames is None and audio is None:
        raise BadInputError(path, "the file has neither a video nor an audio stream", "no_frames")
    return Clip(path, frames, audio, rate, source, fps, sample_rate)
