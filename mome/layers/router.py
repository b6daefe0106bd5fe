"""The MoME router: a bias-free linear layer, softmax in fp32 over the routed experts, top-k, optional renormalisation.

One router per layer is shared by every Matryoshka scale and every modality (the paper's "shared router"). For the
ablation ``router: per_scale`` the layer holds one router per scale id and each row of the batch uses the router of
its own scale id (a tensor, never module state).

The weight is stored as ``(num_routers, num_experts, d)``; with one router, ``weight[0]`` is exactly the weight of
``nn.Linear(d, num_experts, bias=False)`` and is initialised the same way.

``1 <= top_k <= num_experts`` is checked once, by the config schema (``mome.config.validate``, a ``ConfigError`` naming
``model.mome.top_k`` before any backbone loads); the router takes the value as given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn


@dataclass
class RouterOutput:
    """Routing of ``B x S`` tokens over ``E`` routed experts."""

    logits: Tensor  # [B, S, E] fp32
    probs: Tensor  # [B, S, E] fp32, softmax over all routed experts
    topk_idx: Tensor  # [B, S, k] int64, experts chosen by each token (by decreasing probability)
    topk_weight: Tensor  # [B, S, k] fp32 gates (renormalised to sum 1 when the router renormalises)


class Router(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool = True, num_routers: int = 1):
        super().__init__()
        if num_routers < 1:
            raise ValueError(f"Router: num_routers must be >= 1, got {num_routers}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.renormalize = renormalize
        self.num_routers = num_routers
        self.weight = nn.Parameter(torch.empty(num_routers, num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the nn.Linear default (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(d), 1/sqrt(d))
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"renormalize={self.renormalize}, num_routers={self.num_routers}")

    def forward(self, x: Tensor, router_ids: Optional[Tensor] = None) -> RouterOutput:
        """``x``: [B, S, d]; ``router_ids``: LongTensor [B] (which router each row uses; ignored with one router)."""
        w = self.weight.to(x.dtype)
        if self.num_routers == 1:
            logits = x @ w[0].t()
        else:
            if router_ids is None:
                router_ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            logits = torch.bmm(x, w[router_ids].transpose(1, 2))  # each row with its own router
        return self.route(logits)

    def route(self, logits: Tensor) -> RouterOutput:
        """Softmax (fp32) over the routed experts, top-k, optional renormalisation, from router logits."""
        logits = logits.float()
        probs = torch.softmax(logits, dim=-1)
        gates, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return RouterOutput(logits=logits, probs=probs, topk_idx=idx, topk_weight=gates)
