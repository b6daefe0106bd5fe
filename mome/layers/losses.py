"""Auxiliary router losses and expert-load statistics, per (layer, scale), over real (non-padding) tokens.

Load balancing (Switch / Mixtral form, as in the authors' SMoP code; docs/decisions.md#load-balancing): for the tokens of one scale in
one layer call,

    f_e = (1/N) * #{tokens that select e in any of their k slots}      (so sum_e f_e = k)
    P_e = (1/N) * sum_t p_{t,e}                                        (softmax over the routed experts)
    L_B = N_r * sum_e f_e * P_e

With this (default) convention a perfectly balanced router gives ``L_B = k`` (4 for MoME-23/4), the value the paper's
coefficient 0.01 was used with. ``topk_normalize=True`` (config ``model.mome.lb_topk_normalize``) divides by k
instead, so balance gives 1 (the DeepSpeed / MegaBlocks convention). Padding tokens (``token_mask`` False) count in
neither N, f nor P.

Router z-loss: ``mean_t logsumexp(logits_t)^2`` over the real tokens of each scale.

Every function reduces over the sequence first and then adds rows into their scale id with ``index_add``, so nothing
syncs with the host. Each returns per-scale values and a ``tokens`` count per scale; a scale with no tokens in the
call has ``tokens == 0`` and must be left out of averages (see ``mome.adapters.mome.MoMEAdapters.aux_losses``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _row_mask(probs: Tensor, token_mask: Optional[Tensor]) -> Tensor:
    if token_mask is None:
        return probs.new_ones(probs.shape[:2])
    return token_mask.to(probs.dtype)


def selection_counts(topk_idx: Tensor, num_experts: int, token_mask: Optional[Tensor] = None) -> Tensor:
    """[B, E]: per row, how many real tokens selected each expert (in any of their k slots)."""
    sel = torch.zeros(*topk_idx.shape[:2], num_experts, device=topk_idx.device)
    sel.scatter_(-1, topk_idx, 1.0)
    m = _row_mask(sel, token_mask)
    return torch.einsum("bs,bse->be", m, sel)


def routing_stats(probs: Tensor, topk_idx: Tensor, scale_ids: Tensor, num_scales: int,
                  token_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per scale: ``counts`` [G, E] token selections, ``psum`` [G, E] summed probabilities, ``tokens`` [G].

    ``probs`` [B, S, E] fp32 router softmax, ``topk_idx`` [B, S, k], ``scale_ids`` [B] long, ``token_mask`` [B, S]
    bool (True = real token; None = all real).
    """
    E = probs.shape[-1]
    m = _row_mask(probs, token_mask)
    dev = probs.device
    counts = torch.zeros(num_scales, E, device=dev).index_add(0, scale_ids, selection_counts(topk_idx, E, token_mask))
    psum = torch.zeros(num_scales, E, device=dev, dtype=probs.dtype).index_add(
        0, scale_ids, torch.einsum("bs,bse->be", m, probs))
    tokens = torch.zeros(num_scales, device=dev, dtype=probs.dtype).index_add(0, scale_ids, m.sum(1))
    return counts, psum, tokens


def load_balancing_from_stats(counts: Tensor, psum: Tensor, tokens: Tensor, top_k: int,
                              topk_normalize: bool = False) -> Tensor:
    """``N_r * sum_e f_e * P_e`` per scale from ``routing_stats`` (divided by k when ``topk_normalize``)."""
    n = tokens.clamp_min(1.0).unsqueeze(-1)
    loss = counts.shape[-1] * ((counts / n) * (psum / n)).sum(-1)
    return loss / top_k if topk_normalize else loss


def load_balancing_loss(probs: Tensor, topk_idx: Tensor, scale_ids: Tensor, num_scales: int,
                        token_mask: Optional[Tensor] = None, topk_normalize: bool = False) -> Tuple[Tensor, Tensor]:
    """Switch load-balancing loss per scale: ``(loss [num_scales], tokens [num_scales])``."""
    counts, psum, tokens = routing_stats(probs, topk_idx, scale_ids, num_scales, token_mask)
    return load_balancing_from_stats(counts, psum, tokens, topk_idx.shape[-1], topk_normalize), tokens


def router_z_loss(logits: Tensor, scale_ids: Tensor, num_scales: int,
                  token_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Mean over real tokens of ``logsumexp(logits)^2``, per scale. Returns ``(loss [num_scales], tokens)``."""
    m = _row_mask(logits, token_mask)
    z = torch.logsumexp(logits.float(), dim=-1).pow(2)
    zsum = torch.zeros(num_scales, device=logits.device, dtype=z.dtype).index_add(0, scale_ids, (z * m).sum(1))
    tokens = torch.zeros(num_scales, device=logits.device, dtype=z.dtype).index_add(0, scale_ids, m.sum(1))
    return zsum / tokens.clamp_min(1.0), tokens


def expert_load(counts: Tensor, tokens: Tensor, top_k: int) -> Tensor:
    """Fraction of routed token-slots per expert: ``counts`` [..., E] selections, ``tokens`` [...] real tokens.

    Sums to 1 over experts; a perfectly balanced router gives ``1/E`` everywhere.
    """
    return counts / (tokens.clamp_min(1.0).unsqueeze(-1) * top_k)


