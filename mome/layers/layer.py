"""One MoME module: router + routed experts + shared experts, for one LLM layer.

``MoME(u) = sum_shared E_s(u) + sum_{e in topk(u)} g_e(u) * E_e(u)`` for every token ``u`` of a [B, S, d] input.
The module computes in its parameters' dtype (fp32 by default, also under a bf16 frozen LLM) and returns the
input's dtype. Placement inside the LLM is the job of ``mome.adapters.mome``.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from .experts import MoMEExperts, cached_cat, dense_from_hidden, experts_forward, resolve_backend
from .router import Router, RouterOutput


class MoMELayer(nn.Module):
    def __init__(self, dim: int, num_experts: int = 23, top_k: int = 4, num_shared: int = 1, bottleneck: int = 12,
                 renormalize: bool = True, num_routers: int = 1, backend: str = "auto"):
        super().__init__()
        resolve_backend(backend, "cpu")  # fail early on an unknown name
        self.router = Router(dim, num_experts, top_k, renormalize=renormalize, num_routers=num_routers)
        self.experts = MoMEExperts(dim, num_experts, bottleneck, num_shared)
        self.backend = backend

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def extra_repr(self) -> str:
        return f"backend={self.backend}"

    def forward(self, x: Tensor, scale_ids: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tuple[Tensor, RouterOutput]:
        """``x`` [B, S, d], ``scale_ids`` LongTensor [B] (selects the router per row with per-scale routers).

        Returns the MoME output [B, S, d] (to be added to the residual stream) and the routing.
        """
        B, S, d = x.shape
        xc = x.to(self.experts.down.dtype)
        name = resolve_backend(backend or self.backend, x.device)
        if name == "dense" and self.router.num_routers == 1:
            y, routing = self._dense_with_fused_router(xc)
            return y.to(x.dtype), routing
        routing = self.router(xc, scale_ids)
        k = routing.topk_idx.shape[-1]
        y = experts_forward(self.experts, xc.reshape(B * S, d), routing.topk_idx.reshape(B * S, k),
                            routing.topk_weight.reshape(B * S, k), name)
        return y.view(B, S, d).to(x.dtype), routing

    def _dense_with_fused_router(self, xc: Tensor) -> Tuple[Tensor, RouterOutput]:
        """Dense backend with the router's weight appended to the down-projection: one matmul reads the input once
        and yields every expert's bottleneck and the router logits (and in backward one matmul gives the input's
        gradient through both)."""
        B, S, d = xc.shape
        ex, width = self.experts, self.experts.down.shape[1]
        w_in = cached_cat(self, "_w_in_cache", (ex.down, self.router.weight[0].t().to(xc.dtype)), dim=1)
        h, logits = (xc.reshape(B * S, d) @ w_in).split([width, self.router.num_experts], dim=1)
        routing = self.router.route(logits.view(B, S, -1))
        k = routing.topk_idx.shape[-1]
        y = dense_from_hidden(ex, h + ex.down_b, routing.topk_idx.view(B * S, k), routing.topk_weight.view(B * S, k))
        return y.view(B, S, d), routing
