"""Train and eval transforms (docs/method.md#transforms, after auto_avsr).

Video, train: x/255 -> random 88x88 crop -> grayscale -> adaptive time mask (window 10, stride 25) -> normalise
(0.421, 0.165); eval: x/255 -> centre crop -> grayscale -> normalise. Output [T, 1, 88, 88].

Audio, train: adaptive time mask (window 6400, stride 16000) -> additive noise at an SNR drawn uniformly from
``train_snrs`` ("clean" = none) -> layer norm over the whole waveform; eval: noise at a fixed SNR (None = clean,
offset seeded by the utterance id) -> layer norm. Output [S].

Adaptive time mask: ``ceil(len / stride)`` masks, each zeroing a span of random length in [0, window) at a random
start, so at most 0.4 s per second is masked.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mome.config import parse_snr
from mome.data.media import luminance
from mome.data.noise import NoiseSource, eval_rng, mix_at_snr


def time_mask(x: np.ndarray, window: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """Zero ``ceil(len(x) / stride)`` random spans of length < ``window`` along the first axis (in place)."""
    n = len(x)
    if window <= 0 or stride <= 0 or n == 0:
        return x
    for _ in range(-(-n // stride)):
        span = int(rng.integers(0, window))
        if span == 0 or span >= n:
            continue
        start = int(rng.integers(0, n - span + 1))
        x[start:start + span] = 0
    return x


class VideoTransform:
    def __init__(self, tcfg, train: bool):
        self.crop = int(tcfg.crop_size)
        self.mean, self.std = float(tcfg.video_mean), float(tcfg.video_std)
        self.train = train
        self.mask_window, self.mask_stride = int(tcfg.video_mask_window), int(tcfg.video_mask_stride)

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """uint8 [T, H, W] (or [T, H, W, C]) -> float32 [T, 1, crop, crop]."""
        if frames.ndim == 4:  # RGB: BT.601 luminance, as read_video gives
            frames = luminance(frames)
        T, H, W = frames.shape
        c = self.crop
        if H < c or W < c:
            raise ValueError(f"frames of {H}x{W} are smaller than the {c}x{c} crop")
        if self.train:
            top, left = int(rng.integers(0, H - c + 1)), int(rng.integers(0, W - c + 1))
        else:
            top, left = (H - c) // 2, (W - c) // 2
        x = frames[:, top:top + c, left:left + c].astype(np.float32) / 255.0
        if self.train:
            time_mask(x, self.mask_window, self.mask_stride, rng)
        x = (x - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)


class AudioTransform:
    """``snr``: a fixed SNR in dB; None = the training list ``tcfg.train_snrs`` in training, clean in evaluation.
    Clean-first schedule: during training epochs ``< tcfg.clean_epochs`` (``epoch``, set by the dataset) no noise."""

    def __init__(self, tcfg, train: bool, noise: Optional[NoiseSource] = None, snr: Optional[float] = None,
                 noise_seed: int = 0):
        self.train = train
        self.mask_window, self.mask_stride = int(tcfg.audio_mask_window), int(tcfg.audio_mask_stride)
        self.train_snrs: Sequence[Optional[float]] = [parse_snr(s) for s in tcfg.train_snrs]
        self.normalize = bool(tcfg.normalize_waveform)
        self.snr = snr
        self.noise = noise
        self.noise_seed = noise_seed
        self.clean_epochs = int(tcfg.get("clean_epochs", 0))
        self.epoch = 0
        needs_noise = snr is not None or (train and any(s is not None for s in self.train_snrs))
        if needs_noise and noise is None:
            raise ValueError("noisy audio was asked for (train_snrs or an eval SNR) but no noise source was given")

    def pick_snr(self, rng: np.random.Generator) -> Optional[float]:
        if self.snr is not None or not self.train:
            return self.snr
        if self.epoch < self.clean_epochs:
            return None
        return self.train_snrs[int(rng.integers(len(self.train_snrs)))] if self.train_snrs else None

    def __call__(self, audio: np.ndarray, utt_id: str, rng: np.random.Generator) -> torch.Tensor:
        x = np.array(audio, np.float32, copy=True)
        if self.train:
            time_mask(x, self.mask_window, self.mask_stride, rng)
        snr = self.pick_snr(rng)
        if snr is not None:
            noise_rng = rng if self.train else eval_rng(self.noise_seed, utt_id)
            x = mix_at_snr(x, self.noise.segment(len(x), noise_rng), snr)
        t = torch.from_numpy(x)
        if self.normalize:
            t = F.layer_norm(t, t.shape, eps=1e-8)
        return t
