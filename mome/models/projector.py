"""Projectors from compressed encoder tokens to the LLM's embedding space, one per compression rate (MOME.md §2.5).

``Linear(d_in, hidden) -> ReLU -> Linear(hidden, d_llm) -> LayerNorm(d_llm)`` (LayerNorm optional), as in
Llama-AVSR / Llama-MTSK. ``RateProjectors`` holds one projector per rate of one modality; only the chosen rate's
projector runs for a scale.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from mome.models.compression import compressed_dim


class Projector(nn.Sequential):
    def __init__(self, d_in: int, hidden: int, d_out: int, layernorm: bool = True):
        layers = [nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)]
        if layernorm:
            layers.append(nn.LayerNorm(d_out))
        super().__init__(*layers)


class RateProjectors(nn.Module):
    """``projectors[str(rate)]`` for every rate of one modality; call as ``proj(tokens, rate)``."""

    def __init__(self, rates: Iterable[int], d_enc: int, d_llm: int, method: str, hidden: int, layernorm: bool):
        super().__init__()
        self.by_rate = nn.ModuleDict(
            {str(r): Projector(compressed_dim(d_enc, r, method), hidden, d_llm, layernorm) for r in rates}
        )

    @property
    def rates(self):
        return [int(r) for r in self.by_rate]

    def forward(self, tokens: torch.Tensor, rate: int) -> torch.Tensor:
        key = str(rate)
        if key not in self.by_rate:
            raise ValueError(f"no projector for rate {rate}; this model has rates {self.rates}")
        return self.by_rate[key](tokens)
