"""Projectors from compressed encoder tokens to the LLM's embedding space, one per compression rate (docs/method.md#projectors).

``Linear(d_in, hidden) -> ReLU -> Linear(hidden, d_llm) -> LayerNorm(d_llm)`` (LayerNorm optional), as in
Llama-AVSR / Llama-MTSK. ``RateProjectors`` holds one projector per rate of one modality; only the chosen rate's
projector runs for a scale.

Output scale. A LayerNorm output has an RMS of 1 per element (a norm of ``sqrt(d_llm)``, 24 for SmolLM2's 576), while
a frozen LLM's text embeddings are much smaller (SmolLM2-135M: RMS 0.136, norm 3.2): the A/V tokens then enter the
residual stream ~8x larger than the text around them, and the layers' additions barely change them. With
``output_rms > 0`` the LayerNorm's gain starts at that value instead of 1 (``model.projector.match_embedding_rms``
sets it to the LLM's embedding RMS), so the tokens start at the scale of text; the gain stays trainable.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from mome.models.compression import compressed_dim


class Projector(nn.Sequential):
    def __init__(self, d_in: int, hidden: int, d_out: int, layernorm: bool = True, output_rms: float = 0.0):
        layers = [nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)]
        if layernorm:
            layers.append(nn.LayerNorm(d_out))
        elif output_rms > 0:
            raise ValueError("a projector output scale (model.projector.match_embedding_rms) needs "
                             "model.projector.layernorm=true (it initialises the LayerNorm's gain)")
        super().__init__(*layers)
        if output_rms > 0:
            with torch.no_grad():
                self[-1].weight.fill_(float(output_rms))


class RateProjectors(nn.Module):
    """``projectors[str(rate)]`` for every rate of one modality; call as ``proj(tokens, rate)``."""

    def __init__(self, rates: Iterable[int], d_enc: int, d_llm: int, method: str, hidden: int, layernorm: bool,
                 output_rms: float = 0.0):
        super().__init__()
        self.by_rate = nn.ModuleDict(
            {str(r): Projector(compressed_dim(d_enc, r, method), hidden, d_llm, layernorm, output_rms) for r in rates}
        )

    @property
    def rates(self):
        return [int(r) for r in self.by_rate]

    def forward(self, tokens: torch.Tensor, rate: int) -> torch.Tensor:
        key = str(rate)
        if key not in self.by_rate:
            raise ValueError(f"no projector for rate {rate}; this model has rates {self.rates}")
        return self.by_rate[key](tokens)
