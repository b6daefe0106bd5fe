"""Additive noise: babble built from a speech corpus, white noise, or a user noise wav; mixing at an exact SNR.

``mix_at_snr(speech, noise, snr_db)`` scales the noise so that ``10 log10(sum(speech^2) / sum(noise^2))`` equals
``snr_db`` over the utterance (as ``torchaudio.functional.add_noise`` does). Noise segments are cut from a long
noise track at an offset drawn from a generator; ``eval_rng(seed, utt_id)`` makes that offset a function of the
noise seed and the utterance, so two evaluations at the same SNR hear exactly the same noise (and different SNRs
the same noise at different levels).

Babble (the default, as in auto_avsr) is the sum of ``babble_speakers`` talkers, each a stream of randomly chosen
training utterances of a corpus (ours unless told otherwise), normalised to equal loudness. It is built once and
cached as a wav under ``<cache>/noise/``. The reference setting instead takes a given babble recording: with
``data.noise.file`` set (e.g. auto_avsr's ``babble_noise.wav``), babble is that file, in training and evaluation.
``check_noise_file(cfg)`` tells at start, in one line, when that file is missing or unreadable.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from mome.data.media import SAMPLE_RATE, read_audio, write_wav

log = logging.getLogger(__name__)

NOISE_TYPES = ("babble", "white", "file")


def mix_at_snr(speech, noise, snr_db: float):
    """``speech + g * noise`` with ``g`` chosen so the speech-to-noise energy ratio is exactly ``snr_db`` dB.

    ``noise`` must have the same length as ``speech``. Works on numpy arrays and torch tensors (returns the same
    kind, float32). A silent utterance (zero energy) is returned unchanged: its SNR is undefined."""
    is_torch = type(speech).__module__.startswith("torch")
    s = speech.detach().cpu().numpy() if is_torch else np.asarray(speech)
    n = noise.detach().cpu().numpy() if type(noise).__module__.startswith("torch") else np.asarray(noise)
    if s.shape != n.shape:
        raise ValueError(f"speech {s.shape} and noise {n.shape} must have the same shape")
    s64, n64 = s.astype(np.float64), n.astype(np.float64)
    es, en = float(np.sum(s64 * s64)), float(np.sum(n64 * n64))  # not np.dot: BLAS threads stall under load
    if en == 0.0:
        raise ValueError("the noise segment is silent (zero energy); cannot reach a target SNR")
    if es == 0.0:
        out = s.astype(np.float32)
    else:
        gain = np.sqrt(es / (en * 10.0 ** (float(snr_db) / 10.0)))
        out = (s64 + gain * n64).astype(np.float32)
    if is_torch:
        import torch

        return torch.from_numpy(out)
    return out


def achieved_snr(speech: np.ndarray, mixed: np.ndarray) -> float:
    """10 log10(E_speech / E_(mixed - speech)) in dB."""
    s = np.asarray(speech, np.float64)
    d = np.asarray(mixed, np.float64) - s
    return float(10.0 * np.log10(np.sum(s * s) / np.sum(d * d)))


def eval_rng(seed: int, utt_id: str) -> np.random.Generator:
    """The generator for an utterance's evaluation noise: same seed and utterance, same noise."""
    return np.random.default_rng([int(seed), zlib.crc32(utt_id.encode("utf-8"))])


class NoiseSource:
    """A noise track (float32, 16 kHz, unit RMS) from which segments are cut at random offsets (wrapping)."""

    name = "noise"

    def __init__(self, track: np.ndarray, name: str):
        track = np.asarray(track, np.float32)
        if track.ndim != 1 or len(track) == 0:
            raise ValueError(f"{name}: a noise track must be a non-empty 1-D waveform")
        rms = float(np.sqrt(np.mean(track.astype(np.float64) ** 2)))
        if rms == 0.0:
            raise ValueError(f"{name}: the noise track is silent")
        self.track = track / rms
        self.name = name

    def segment(self, length: int, rng: np.random.Generator) -> np.ndarray:
        start = int(rng.integers(len(self.track)))
        idx = (start + np.arange(length)) % len(self.track)
        return self.track[idx]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.track) / SAMPLE_RATE:.1f} s)"


class WhiteNoise(NoiseSource):
    """Gaussian white noise; a segment is drawn fresh from the generator (no track)."""

    def __init__(self):
        self.name = "white"
        self.track = np.zeros(0, np.float32)

    def segment(self, length: int, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(length, dtype=np.float32)

    def __repr__(self) -> str:
        return "WhiteNoise()"


def file_noise(path: str | os.PathLike) -> NoiseSource:
    """A user noise recording (MUSAN, NOISEX ...), any sample rate (resampled to 16 kHz), channels averaged."""
    return NoiseSource(read_audio(path), name=f"file:{path}")


def build_babble(audio_paths: Sequence[str | os.PathLike], num_talkers: int = 30, seed: int = 0,
                 duration_s: float = 60.0) -> np.ndarray:
    """Babble track: ``num_talkers`` streams of back-to-back utterances (random order, each at equal RMS), summed."""
    if not audio_paths:
        raise ValueError("babble noise needs at least one speech file")
    rng = np.random.default_rng([int(seed), 0xBAB])
    length = int(duration_s * SAMPLE_RATE)
    cache: dict = {}

    def load(k: int) -> np.ndarray:
        if k not in cache:
            a = read_audio(audio_paths[k])
            rms = float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))
            cache[k] = a / rms if rms > 0 else a
        return cache[k]

    track = np.zeros(length, np.float64)
    for _ in range(num_talkers):
        stream: List[np.ndarray] = []
        filled = 0
        while filled < length:
            a = load(int(rng.integers(len(audio_paths))))
            stream.append(a)
            filled += len(a)
        talker = np.concatenate(stream)[:length]
        track += np.roll(talker, int(rng.integers(length)))
    return track.astype(np.float32)


def babble_from_manifest(root: str | os.PathLike, csv_path: str | os.PathLike, num_talkers: int, seed: int,
                         cache: str | os.PathLike, duration_s: float = 60.0) -> NoiseSource:
    """Babble from the audio of a label CSV's utterances, cached in ``<cache>/noise/babble-<hash>.wav``."""
    from mome.data.manifest import read_manifest

    root, csv_path = Path(root), Path(csv_path)
    stat = csv_path.stat()
    key = json.dumps([str(root.resolve()), str(csv_path.resolve()), stat.st_size, int(stat.st_mtime),
                      num_talkers, seed, duration_s])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    path = Path(cache).expanduser() / "noise" / f"babble-{digest}.wav"
    if path.is_file():
        return NoiseSource(read_audio(path), name=f"babble:{path.name}")
    rows = read_manifest(csv_path)
    paths = [r.audio_path(root) for r in rows]
    paths = [p for p in paths if p.is_file() and p.stat().st_size > 0]
    track = build_babble(paths, num_talkers, seed, duration_s)
    track = track / max(float(np.abs(track).max()), 1e-9) * 0.9  # fits 16-bit PCM
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, track)
    log.info("built babble noise from %d utterances of %s into %s", len(paths), csv_path, path)
    return NoiseSource(read_audio(path), name=f"babble:{path.name}")


class NoiseFileError(ValueError):
    """``data.noise.file`` is needed but missing or unreadable; the one-line message names the key and the file."""


def check_noise_file(cfg, noise_types: Sequence[str] = ()) -> None:
    """Fail fast (before any model loads) when a noise type in ``noise_types`` (default: ``data.noise.type``) reads
    ``data.noise.file`` and that file is missing or not a readable audio file. Reads only the file's header."""
    types = set(noise_types or [cfg.data.noise.type])
    path = str(cfg.data.noise.file or "")
    if "file" in types and not path:
        raise NoiseFileError("noise type 'file' needs data.noise.file (a noise wav such as MUSAN or NOISEX babble)")
    if not path or not types & {"babble", "file"}:
        return
    p = Path(path).expanduser()
    if not p.is_file():
        raise NoiseFileError(f"data.noise.file: {p}: no such noise file")
    import soundfile as sf

    try:
        info = sf.info(str(p))
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError with libsndfile's complaint
        raise NoiseFileError(f"data.noise.file: {p}: not a readable audio file ({str(exc).splitlines()[0][:160]})") \
            from None
    if info.frames == 0:
        raise NoiseFileError(f"data.noise.file: {p}: the noise file has no samples")


def noise_name(cfg, noise_type: Optional[str] = None) -> str:
    """What a results table calls the noise: ``babble (babble_noise.wav)``, ``babble (training speech)``, ..."""
    ntype = noise_type or cfg.data.noise.type
    if ntype == "white":
        return "white"
    if ntype == "file" or cfg.data.noise.file:
        return f"{ntype} ({Path(str(cfg.data.noise.file)).name})"
    return f"{ntype} ({cfg.data.noise.babble_speakers} talkers of the training speech)"


def build_noise_source(cfg, noise_type: Optional[str] = None) -> NoiseSource:
    """The noise of ``cfg.data.noise`` (``noise_type`` overrides its type): babble (the recording
    ``data.noise.file`` when given, else built from the training split of the configured corpus), white, or the
    recording ``data.noise.file``."""
    ntype = noise_type or cfg.data.noise.type
    if ntype not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {ntype!r}; choose one of {', '.join(NOISE_TYPES)}")
    if ntype == "white":
        return WhiteNoise()
    if ntype == "file" or cfg.data.noise.file:
        check_noise_file(cfg, [ntype])
        src = file_noise(cfg.data.noise.file)
        src.name = f"{ntype}:{Path(str(cfg.data.noise.file)).name}" if ntype == "babble" else src.name
        return src
    from mome.config import cache_dir
    from mome.data.synth import ensure_corpus

    root = ensure_corpus(cfg)
    csv = Path(cfg.data.train_csv)
    csv = csv if csv.is_absolute() else root / csv
    return babble_from_manifest(root, csv, cfg.data.noise.babble_speakers, cfg.data.noise.seed, cache_dir(cfg))
