"""Audio and video encoders behind one interface, and the registry that builds them by name.

Every encoder maps a padded batch plus per-sample lengths to features plus per-sample lengths:

    features, lengths = encoder(x, x_lengths)      # features [B, T, encoder.output_dim], lengths [B] (LongTensor)

and has ``output_dim`` and ``frozen`` (True when its pretrained weights stay fixed; a frozen encoder's weights are
fingerprinted in checkpoints). Features past a sample's length are zero.

Audio: ``WhisperAudioEncoder`` (any HF Whisper, frozen). Video: ``frontend`` (``mome.models.video_frontend``, small,
trainable) and ``avhubert`` (``mome.models.avhubert``, registered by that module). New video encoders register with
``@register_video_encoder("name")`` on a builder ``build(video_cfg, *, cache_dir, device) -> encoder``; the name is
``model.video_encoder.type``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mome.models.backbones import load_whisper_encoder

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160  # 100 mel frames per second; Whisper's conv stride 2 gives 50 encoder frames per second
SAMPLES_30S = 30 * SAMPLE_RATE


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] lengths -> [B, max_len] bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Whisper


def whisper_mel_filters(num_mel_bins: int) -> torch.Tensor:
    """Whisper's Slaney mel filter bank [n_freq, n_mels] (from transformers' WhisperFeatureExtractor)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=num_mel_bins)
    return torch.from_numpy(fe.mel_filters).float()


def log_mel(wave: torch.Tensor, mel_filters: torch.Tensor) -> torch.Tensor:
    """Whisper's log-mel spectrogram of one or more equal-length waveforms [..., N] -> [..., n_mels, N // 160].

    Same recipe as ``WhisperFeatureExtractor`` (centred STFT, last frame dropped, log10, floor at max - 8 per clip,
    (x + 4) / 4), in torch so it runs on the model's device.
    """
    window = torch.hann_window(N_FFT, device=wave.device)
    stft = torch.stft(wave.float(), N_FFT, HOP, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = mel_filters.T.to(wave.device) @ power
    logm = torch.clamp(mel, min=1e-10).log10()
    floor = logm.amax(dim=(-2, -1), keepdim=True) - 8.0
    return (torch.maximum(logm, floor) + 4.0) / 4.0


class WhisperAudioEncoder(nn.Module):
    """Frozen Whisper encoder with exact padding masking and short clips.

    Default (``pad_to_30s=False``): each clip's log-mel is computed from its own samples only; the convolutions'
    outputs are zeroed past each clip's length and the self-attention masks padded frames, so a clip's features do
    not depend on the batch it is in. The positional table is cropped to the batch's length (``embed_positions``
    rows ``[:T]``, i.e. a shorter ``max_source_positions``), so a 2 s clip costs 100 frames, not 1500.

    ``pad_to_30s=True`` is the stock behaviour: every clip is zero-padded to 30 s, the unmodified HF encoder runs on
    3000 mel frames, and each clip's output is cut to its own length.

    Output: 50 frames per second, ``lengths = ceil(mel_frames / 2)`` with ``mel_frames = samples // 160``.
    """

    frame_rate = 50.0
    frozen = True

    def __init__(self, encoder: nn.Module, pad_to_30s: bool = False):
        super().__init__()
        self.encoder = encoder
        self.pad_to_30s = pad_to_30s
        cfg = encoder.config
        self.output_dim = cfg.d_model
        self.max_frames = cfg.max_source_positions
        self.register_buffer("mel_filters", whisper_mel_filters(cfg.num_mel_bins), persistent=False)

    @classmethod
    def from_config(cls, audio_cfg, cache_dir: Optional[Path] = None, device: Optional[str] = None):
        return cls(load_whisper_encoder(audio_cfg, cache_dir, device), pad_to_30s=audio_cfg.pad_to_30s)

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    @staticmethod
    def output_lengths(audio_lengths: torch.Tensor) -> torch.Tensor:
        mel = audio_lengths // HOP
        return (mel + 1) // 2  # conv2: kernel 3, stride 2, padding 1

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        lengths = self.output_lengths(audio_lengths)
        if int(lengths.max()) > self.max_frames:
            raise ValueError(
                f"audio of {int(audio_lengths.max()) / SAMPLE_RATE:.1f} s is longer than Whisper's "
                f"{self.max_frames / self.frame_rate:.0f} s window"
            )
        if int(audio_lengths.min()) <= N_FFT // 2:
            raise ValueError(f"audio clip of {int(audio_lengths.min())} samples is too short for Whisper's STFT")
        dtype = self.encoder.conv1.weight.dtype
        if self.pad_to_30s:
            out = self._forward_30s(audio, audio_lengths, dtype)
        else:
            out = self._forward_short(audio, audio_lengths, dtype)
        out = out[:, : int(lengths.max())].float()
        return out * lengths_to_mask(lengths, out.shape[1])[..., None], lengths

    def _forward_30s(self, audio, audio_lengths, dtype):
        wave = torch.zeros(audio.shape[0], SAMPLES_30S, device=audio.device)
        for i, n in enumerate(audio_lengths.tolist()):
            wave[i, :n] = audio[i, :n]
        mel = log_mel(wave, self.mel_filters)
        return self.encoder(input_features=mel.to(dtype)).last_hidden_state

    def _forward_short(self, audio, audio_lengths, dtype):
        enc = self.encoder
        mel_len = audio_lengths // HOP
        mel = audio.new_zeros(audio.shape[0], self.mel_filters.shape[1], int(mel_len.max()))
        for i, n in enumerate(audio_lengths.tolist()):  # per clip: STFT edges and the max-8 floor see only the clip
            m = log_mel(audio[i, :n], self.mel_filters)
            mel[i, :, : m.shape[-1]] = m
        mel = mel.to(dtype)
        x = F.gelu(enc.conv1(mel)) * lengths_to_mask(mel_len, mel.shape[-1])[:, None, :].to(dtype)
        x = F.gelu(enc.conv2(x)).transpose(1, 2)
        lengths = self.output_lengths(audio_lengths)
        valid = lengths_to_mask(lengths, x.shape[1])
        x = x + enc.embed_positions.weight[: x.shape[1]]
        # additive key-padding mask [B, 1, 1, T]: padded frames are never attended to
        mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~valid, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in enc.layers:
            x = layer(x, mask)
        return enc.layer_norm(x)


# ----------------------------------------------------------------------------------------------------------------
# registries

VideoBuilder = Callable[..., nn.Module]
_VIDEO_ENCODERS: Dict[str, VideoBuilder] = {}
# encoders that live in their own module and register themselves when it is imported
_VIDEO_ENCODER_MODULES = {"frontend": "mome.models.video_frontend"}


def register_video_encoder(name: str):
    """Decorator: ``@register_video_encoder("x")`` on ``build(video_cfg, *, cache_dir, device) -> encoder``."""

    def deco(builder: VideoBuilder) -> VideoBuilder:
        _VIDEO_ENCODERS[name] = builder
        return builder

    return deco


def video_encoder_names():
    return sorted(set(_VIDEO_ENCODERS) | set(_VIDEO_ENCODER_MODULES))


def build_video_encoder(video_cfg, cache_dir: Optional[Path] = None, device: Optional[str] = None) -> nn.Module:
    name = video_cfg.type
    if name not in _VIDEO_ENCODERS and name in _VIDEO_ENCODER_MODULES:
        importlib.import_module(_VIDEO_ENCODER_MODULES[name])
    if name not in _VIDEO_ENCODERS:
        raise ValueError(f"unknown video encoder '{name}'; registered: {', '.join(video_encoder_names())}")
    return _VIDEO_ENCODERS[name](video_cfg, cache_dir=cache_dir, device=device)


@register_video_encoder("avhubert")
def build_avhubert(video_cfg, *, cache_dir: Optional[Path] = None, device: Optional[str] = None) -> nn.Module:
    """AV-HuBERT (``mome.models.avhubert``) from ``cfg.model.video_encoder`` (checkpoint, size, frozen, LoRA)."""
    from mome.models.avhubert import AVHubertEncoder

    v = video_cfg
    kwargs = dict(size=str(v.size), checkpoint=str(v.checkpoint or ""), frozen=bool(v.frozen),
                  lora_rank=int(v.lora_rank), lora_scaling=float(v.lora_scaling), strict_load=bool(v.strict_load))
    if device == "meta":
        with torch.device("meta"):
            return AVHubertEncoder(**kwargs)
    return AVHubertEncoder(**kwargs)


def build_audio_encoder(audio_cfg, cache_dir: Optional[Path] = None, device: Optional[str] = None) -> nn.Module:
    return WhisperAudioEncoder.from_config(audio_cfg, cache_dir, device)
