"""Reading and writing the corpus media: mouth-ROI mp4 video (PyAV writes, decord reads) and 16 kHz wav audio.

Every read problem becomes a ``BadInputError`` whose message names the file and the problem.
"""
from __future__ import annotations

import os
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Tuple

import numpy as np

SAMPLE_RATE = 16000
FPS = 25


# kinds of bad input (BadInputError.kind), in the order the skip report lists them
BAD_KINDS = ("missing", "empty_file", "undecodable", "truncated", "no_frames", "short_audio", "empty_transcript",
             "too_small")


class BadInputError(ValueError):
    """A media file or manifest row cannot give a correct sample; the message names the file and the problem."""

    def __init__(self, path, problem: str = "", kind: str = "undecodable"):
        if kind not in BAD_KINDS:
            raise ValueError(f"unknown bad-input kind {kind!r}")
        self.path, self.problem, self.kind = str(path), problem, kind
        # one argument: an already formatted message (how DataLoader workers re-raise an exception)
        super().__init__(f"{path}: {problem}" if problem else str(path))

    def __reduce__(self):  # survives the trip from a DataLoader worker
        return (BadInputError, (self.path, self.problem, self.kind))


def _check_file(path: Path, kind: str) -> None:
    if not path.exists():
        raise BadInputError(path, f"{kind} file is missing", "missing")
    if not path.is_file():
        raise BadInputError(path, f"{kind} path is not a file", "missing")
    if path.stat().st_size == 0:
        raise BadInputError(path, f"{kind} file is empty (0 bytes)", "empty_file")


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = FPS, crf: int = 20) -> None:
    """Write uint8 grayscale frames [T, H, W] as H.264 mp4 (yuv420p, which decord reads back within +-1 grey level).

    Written to a temporary name and renamed, so a crash never leaves a partial file under the final name."""
    import av

    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 3 or len(frames) == 0:
        raise ValueError(f"{path}: expected frames [T>0, H, W], got shape {frames.shape}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        time_base = Fraction(1, fps)
        stream.codec_context.time_base = time_base
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # mbtree off: with it this x264 build gives a different bitstream from run to run for the same frames
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        # limited-range (16-235) luma and neutral chroma, as swscale would make from gray; decord maps it back
        H, W = frames.shape[1:]
        yuv = np.full((len(frames), H * 3 // 2, W), 128, np.uint8)
        yuv[:, :H] = np.rint(16.0 + frames.astype(np.float32) * (219.0 / 255.0)).astype(np.uint8)
        for t in range(len(frames)):
            frame = av.VideoFrame.from_ndarray(yuv[t], format="yuv420p")
            frame.pts = t
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono wav (what LRS ships); atomic like ``write_video``."""
    import soundfile as sf

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.wav")
    sf.write(str(tmp), np.asarray(audio, np.float32), sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def quantize_pcm16(audio: np.ndarray) -> np.ndarray:
    """The float32 waveform a PCM_16 wav of ``audio`` reads back as (so what we keep equals what we store)."""
    return (np.clip(np.rint(np.asarray(audio, np.float64) * 32768.0), -32768, 32767) / 32768.0).astype(np.float32)


# ITU-R BT.601 luma weights: what the reference LRS2/LRS3 pipelines (auto_avsr, AV-HuBERT) turn colour frames into
# before normalising with luminance statistics (data.transforms.video_mean / video_std = 0.421 / 0.165)
BT601 = (0.299, 0.587, 0.114)


def luminance(frames: np.ndarray) -> np.ndarray:
    """uint8 BT.601 luminance [..., H, W] of uint8 RGB frames [..., H, W, 3] (grey frames come back unchanged)."""
    rgb = np.asarray(frames)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [..., H, W, 3], got shape {rgb.shape}")
    y = rgb[..., 0] * np.float32(BT601[0]) + rgb[..., 1] * np.float32(BT601[1]) + rgb[..., 2] * np.float32(BT601[2])
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """uint8 grayscale frames [T, H, W] of a video file: decord's RGB output as BT.601 luminance (``luminance``)."""
    path = Path(path)
    _check_file(path, "video")
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord raises DECORDError / RuntimeError with ffmpeg's complaint
        problem, kind = _diagnose_video(path, exc)
        raise BadInputError(path, problem, kind) from None
    n = len(reader)
    if n == 0:
        raise BadInputError(path, "video has no frames", "no_frames")
    try:
        frames = reader.get_batch(list(range(n))).asnumpy()
    except Exception as exc:
        raise BadInputError(path, f"video is truncated or corrupt: decoding {n} frames failed ({_first_line(exc)})",
                            "truncated") from None
    if frames.ndim != 4 or frames.shape[0] != n:
        raise BadInputError(path, f"decoder returned frames of shape {frames.shape}, expected [{n}, H, W, C]",
                            "undecodable")
    return luminance(frames)


def _diagnose_video(path: Path, exc: BaseException) -> Tuple[str, str]:
    """Why decord could not open ``path``: (problem, kind), from a second look with PyAV."""
    import av

    try:
        with av.open(str(path)) as container:
            streams = container.streams.video
            if not streams:
                return "no video frames (the file has no video stream)", "no_frames"
            n = sum(1 for _ in container.decode(streams[0]))
            if n == 0:
                return "video has no frames", "no_frames"
    except Exception as exc2:  # noqa: BLE001 - any failure to read is the diagnosis
        with open(path, "rb") as fh:
            head = fh.read(12)
        if head[4:8] == b"ftyp":
            return f"truncated mp4: the file was cut short ({_first_line(exc2)})", "truncated"
        return f"cannot decode video: not a readable media file ({_first_line(exc2)})", "undecodable"
    return f"cannot decode video ({_first_line(exc)})", "undecodable"


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 mono waveform [N] at ``sample_rate`` (other rates are resampled, channels averaged)."""
    path = Path(path)
    _check_file(path, "audio")
    import soundfile as sf

    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise BadInputError(path, f"cannot decode audio ({_first_line(exc)})", "undecodable") from None
    channels = audio
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if len(audio) == 0:
        raise BadInputError(path, "audio has no samples", "short_audio")
    _warn_if_silent(path, channels, audio)
    if sr != sample_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(sr, sample_rate)
        audio = resample_poly(audio, sample_rate // g, sr // g).astype(np.float32)
    if not np.all(np.isfinite(audio)):
        raise BadInputError(path, "audio contains NaN or infinite samples", "undecodable")
    return np.ascontiguousarray(audio, dtype=np.float32)


class AudioWarning(UserWarning):
    """Audio that decodes but is probably not what was meant (silent, or stereo channels that cancel)."""


SILENCE = 1.0 / 32768  # below one step of 16-bit PCM


def _warn_if_silent(path: Path, channels: np.ndarray, mono: np.ndarray) -> None:
    """Warn (once per file and process) when the mono waveform is silent, and say why when the channels are not."""
    peak = float(np.max(np.abs(mono))) if mono.size else 0.0
    if not np.isfinite(peak) or peak >= SILENCE:
        return
    channel_peak = float(np.max(np.abs(channels))) if channels.size else 0.0
    if channels.shape[1] > 1 and channel_peak >= SILENCE:
        warnings.warn(f"{path}: the {channels.shape[1]} channels cancel when averaged to mono (one is the negative "
                      f"of the other?): channel peak {channel_peak:.3g}, mono peak {peak:.3g}; the model hears "
                      f"silence", AudioWarning, stacklevel=3)
    else:
        warnings.warn(f"{path}: audio is silent (peak {peak:.3g})", AudioWarning, stacklevel=3)


def audio_path_for(video_path: str | os.PathLike) -> Path:
    """The auto_avsr convention: the wav sits next to the mp4 with the same stem."""
    p = Path(video_path)
    return p.with_suffix(".wav")


def align_audio(audio: np.ndarray, num_frames: int, path, samples_per_frame: int = 640,
                max_shortfall: float = 0.1) -> Tuple[np.ndarray, int]:
    """Crop or zero-pad ``audio`` to ``num_frames * samples_per_frame`` samples (auto_avsr's rule).

    A shortfall larger than ``max_shortfall`` of the expected length (and more than two frames' worth) means the
    audio does not belong to the whole video: ``BadInputError``. Returns (aligned audio, padded sample count)."""
    expected = num_frames * samples_per_frame
    short = expected - len(audio)
    if short > max(2 * samples_per_frame, max_shortfall * expected):
        raise BadInputError(path, f"audio is much shorter than the video: {len(audio)} samples "
                                  f"({len(audio) / SAMPLE_RATE:.2f} s) for {num_frames} frames "
                                  f"({expected} samples expected)", "short_audio")
    if short > 0:
        return np.concatenate([audio, np.zeros(short, np.float32)]), short
    return audio[:expected], 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
