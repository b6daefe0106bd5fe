"""Projectors from compressed encoder tokens to the LLM's embedding space, one per compression rate (docs/method.md#projectors).

``Linear(d_in, hidden) -> ReLU -> Linear(hidden, d_llm) -> LayerNorm(d_llm)`` (LayerNorm optional), as in
Llama-AVSR / Llama-MTSK. ``RateProjectors`` holds one projector per rate of one modality; only the chosen rate's
projector runs for a scale. With ``shared=True`` (``model.projector.shared``) it holds one projector that every rate
uses, as Omni-AVSR's single Matryoshka projector: average pooling keeps the encoder's feature space at every rate, so
what the projector learns from one rate carries over to the others (the key is then ``by_rate.shared``).

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

    SHARED = "shared"

    def __init__(self, rates: Iterable[int], d_enc: int, d_llm: int, method: str, hidden: int, layernorm: bool,
                 output_rms: float = 0.0, shared: bool = False):
        super().__init__()
        self.rates = sorted(int(r) for r in rates)
        dims = {r: compressed_dim(d_enc, r, method) for r in self.rates}
        if shared and len(set(dims.values())) > 1:
            raise ValueError(f"one projector for rates {self.rates} needs tokens of one width, got {dims} ({method})")
        keys = [self.SHARED] if shared else [str(r) for r in self.rates]
        width = {k: dims[self.rates[0]] if shared else dims[int(k)] for k in keys}
        self.by_rate = nn.ModuleDict({k: Projector(width[k], hidden, d_llm, layernorm, output_rms) for k in keys})
        self.shared = shared

    def forward(self, tokens: torch.Tensor, rate: int) -> torch.Tensor:
        if int(rate) not in self.rates:
            raise ValueError(f"no projector for rate {rate}; this model has rates {self.rates}")
        return self.by_rate[self.SHARED if self.shared else str(rate)](tokens)
