"""Matryoshka token compression: average pooling or stacking of encoder frames at a rate r (docs/method.md#compression).

Both methods use floor semantics: a clip of T valid frames gives ``T // r`` tokens and its trailing ``T % r`` frames
are dropped. A pooled token is valid only when its whole window lies inside the clip, so a clip's tokens never mix
in padding, and tokens past its pooled length are zero.

* ``avgpool``: ``[B, T, d] -> [B, T // r, d]`` (mean of each window of r frames);
* ``stack``:   ``[B, T, d] -> [B, T // r, r * d]`` (the r frames concatenated, oldest first).
"""
from __future__ import annotations

from typing import Tuple

import torch

from mome.config import COMPRESSION_METHODS as METHODS


def compressed_dim(dim: int, rate: int, method: str) -> int:
    """Feature size after compressing ``dim``-sized frames at ``rate``."""
    _check(rate, method)
    return dim * rate if method == "stack" else dim


def compress(x: torch.Tensor, lengths: torch.Tensor, rate: int, method: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` [B, T, d] with valid ``lengths`` [B] -> (tokens [B, T // rate, d'], token lengths [B] = lengths // rate)."""
    _check(rate, method)
    b, t, d = x.shape
    n = t // rate
    windows = x[:, : n * rate].reshape(b, n, rate, d)
    out = windows.mean(dim=2) if method == "avgpool" else windows.reshape(b, n, rate * d)
    out_lengths = torch.div(lengths, rate, rounding_mode="floor")
    valid = torch.arange(n, device=x.device)[None, :] < out_lengths[:, None]
    return out * valid[..., None].to(out.dtype), out_lengths


def _check(rate: int, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown compression method '{method}'; choose one of {', '.join(METHODS)}")
    if rate < 1:
        raise ValueError(f"compression rate must be a positive integer, got {rate}")
