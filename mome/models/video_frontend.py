"""A small trainable lip-reading front end (the embedded default, where no pretrained visual encoder ships offline).

Shape of the classic VSR front end (3D-conv stem, ResNet-style 2D trunk applied per frame, temporal layers), sized
for CPU training:

    video [B, T, 1, 88, 88]
      -> Conv3d(1, C, kernel 3x5x5, stride 1x2x2) + per-frame GroupNorm + ReLU + MaxPool(1x3x3, 1x2x2)   [C, 22, 22]
      -> per frame: BasicBlock(C, stride 2) -> BasicBlock(2C, stride 2) -> BasicBlock(4C, stride 2)     [4C, 3, 3]
      -> global average pool -> Linear(4C, dim)
      -> ``temporal_layers`` x residual [LayerNorm -> depthwise temporal conv (k=5) -> GELU -> Linear]
    features [B, T, dim] at 25 Hz (one per video frame)

Every normalisation is per frame or per token (GroupNorm, LayerNorm; no BatchNorm) and padded frames are zeroed
before every temporal operation, so a clip's features do not depend on the clips it is batched with.
With C=32, dim=256: ~0.6 M parameters and ~11 MFLOP-MACs per frame.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mome.models.encoders import lengths_to_mask, register_video_encoder


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a (strided) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out))

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class TemporalBlock(nn.Module):
    """Pre-norm residual block mixing neighbouring frames (depthwise conv) then channels."""

    def __init__(self, dim: int, kernel: int = 5):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, valid):  # x [B, T, D], valid [B, T, 1]
        y = self.norm(x) * valid
        y = self.conv(y.transpose(1, 2)).transpose(1, 2)
        return (x + self.proj(F.gelu(y))) * valid


class VideoFrontend(nn.Module):
    frame_rate = 25.0
    frozen = False  # trained from scratch with the rest of the model

    def __init__(self, channels: int = 32, dim: int = 256, temporal_layers: int = 2):
        super().__init__()
        c = channels
        self.stem = nn.Conv3d(1, c, (3, 5, 5), (1, 2, 2), (1, 2, 2), bias=False)
        self.stem_norm = _norm(c)
        self.trunk = nn.Sequential(BasicBlock(c, c, 2), BasicBlock(c, 2 * c, 2), BasicBlock(2 * c, 4 * c, 2))
        self.to_dim = nn.Linear(4 * c, dim)
        self.temporal = nn.ModuleList(TemporalBlock(dim) for _ in range(temporal_layers))
        self.out_norm = nn.LayerNorm(dim)
        self.output_dim = dim

    @staticmethod
    def output_lengths(video_lengths: torch.Tensor) -> torch.Tensor:
        return video_lengths

    def forward(self, video: torch.Tensor, video_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if video.dim() != 5 or video.shape[2] != 1:
            raise ValueError(f"video front end expects [B, T, 1, H, W] grayscale frames, got {tuple(video.shape)}")
        b, t = video.shape[:2]
        valid = lengths_to_mask(video_lengths, t)
        x = video * valid[:, :, None, None, None].to(video.dtype)  # padded frames are exactly zero
        x = self.stem(x.transpose(1, 2))  # [B, C, T, H', W']
        x = x.transpose(1, 2).flatten(0, 1)  # per frame from here on: [B*T, C, H', W']
        x = F.max_pool2d(F.relu(self.stem_norm(x)), 3, 2, 1)
        x = self.trunk(x).mean(dim=(2, 3))
        x = self.to_dim(x).view(b, t, -1)
        v = valid[..., None].to(x.dtype)
        x = x * v
        for block in self.temporal:
            x = block(x, v)
        return self.out_norm(x) * v, video_lengths


@register_video_encoder("frontend")
def build_frontend(video_cfg, *, cache_dir: Optional[Path] = None, device: Optional[str] = None) -> VideoFrontend:
    kwargs = dict(channels=video_cfg.channels, dim=video_cfg.dim, temporal_layers=video_cfg.temporal_layers)
    if device == "meta":
        with torch.device("meta"):
            return VideoFrontend(**kwargs)
    return VideoFrontend(**kwargs)
