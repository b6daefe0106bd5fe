"""Routed and shared bottleneck experts, stored as stacked tensors, with interchangeable compute backends.

Every expert is ``E(u) = GELU(u @ W_down + b_down) @ W_up + b_up`` with a bottleneck of width ``b``. A layer holds
``E`` routed experts and ``S`` shared experts. All of them live in four tensors (no ``ModuleList``, so DDP needs no
``find_unused_parameters`` and ZeRO-3 sees ordinary parameters), with the shared experts fused into one bottleneck
of width ``S * b`` placed after the routed ones::

    down    [d, (E+S)*b]   columns e*b:(e+1)*b are expert e's W_down (routed e < E; the last S*b columns: shared)
    down_b  [(E+S)*b]
    up      [(E+S)*b, d]   rows e*b:(e+1)*b are expert e's W_up
    up_b    [E+S, d]       one output bias per expert (per shared expert too, so parameter counts match the paper)

This is the stacked ``down (E, d, b)`` / ``up (E, b, d)`` layout of MoE codebases, laid out so that the dense
backend multiplies by the stored tensors without copying them; ``routed_down()`` / ``routed_up()`` give the
``(E, d, b)`` / ``(E, b, d)`` views. ``up`` and ``up_b`` start at zero, so a fresh MoME adds exactly zero and the
model equals the frozen LLM; ``down`` and ``down_b`` get the ``nn.Linear`` default init so gradients flow.

Backends (``experts_forward(experts, x, topk_idx, topk_weight, backend)``), all equal up to float rounding:

* ``dense``: one matmul computes every expert's down-projection (routed and shared: only ``(E+S)*b`` wide), GELU,
  multiply each expert's block by its gate (0 for unselected experts, 1 for shared ones), one matmul for all
  up-projections and the gated output biases. No gather, no scatter, no host sync, no loop. ``MoMELayer`` also
  folds the (shared) router into the down-projection matmul, so the input is read once.
* ``grouped_mm``: sort the token-slots by expert, ``torch._grouped_mm`` over the jagged groups, weight by the gates,
  ``index_add`` back; the shared bottleneck is one plain matmul pair. No host sync.
* ``loop``: the plain reference, one Python iteration per expert (``torch.where`` syncs once per expert).

``auto`` resolves per device type through ``AUTO_BACKEND``, a table filled from measurements made with
``benchmarks/moe_layer.py`` (see that file's docstring for the numbers).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cached_cat(owner: nn.Module, slot: str, tensors: Tuple[Tensor, ...], dim: int) -> Tensor:
    """``torch.cat(tensors, dim)``, reused across calls while autograd is off and no input has changed in place.

    During training the concatenation is part of the graph and is rebuilt every call (a few MB, negligible next to
    the matmuls); at decode time (one token per step) reusing it avoids a weight copy per layer and token.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return torch.cat(tensors, dim)
    key = tuple((t.data_ptr(), t._version, t.shape, t.dtype, t.device) for t in tensors) + (dim,)
    cached = owner.__dict__.get(slot)
    if cached is None or cached[0] != key:
        cached = (key, torch.cat([t.detach() for t in tensors], dim))
        owner.__dict__[slot] = cached
    return cached[1]


class MoMEExperts(nn.Module):
    def __init__(self, dim: int, num_experts: int, bottleneck: int, num_shared: int = 1):
        super().__init__()
        if num_experts < 1 or bottleneck < 1 or num_shared < 0:
            raise ValueError(f"MoMEExperts: need num_experts >= 1, bottleneck >= 1, num_shared >= 0; got "
                             f"{num_experts}, {bottleneck}, {num_shared}")
        self.dim, self.num_experts, self.bottleneck, self.num_shared = dim, num_experts, bottleneck, num_shared
        width = (num_experts + num_shared) * bottleneck
        self.down = nn.Parameter(torch.empty(dim, width))
        self.down_b = nn.Parameter(torch.empty(width))
        self.up = nn.Parameter(torch.zeros(width, dim))
        self.up_b = nn.Parameter(torch.zeros(num_experts + num_shared, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.dim)  # nn.Linear(d, b) default for weight and bias
        nn.init.uniform_(self.down, -bound, bound)
        nn.init.uniform_(self.down_b, -bound, bound)
        nn.init.zeros_(self.up)
        nn.init.zeros_(self.up_b)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, bottleneck={self.bottleneck}, "
                f"num_shared={self.num_shared}")

    # views in the usual stacked layout ------------------------------------------------------------------------
    @property
    def routed_width(self) -> int:
        return self.num_experts * self.bottleneck

    def routed_down(self) -> Tensor:  # (E, d, b), a strided view
        return self.down[:, : self.routed_width].view(self.dim, self.num_experts, self.bottleneck).permute(1, 0, 2)

    def routed_down_b(self) -> Tensor:  # (E, b)
        return self.down_b[: self.routed_width].view(self.num_experts, self.bottleneck)

    def routed_up(self) -> Tensor:  # (E, b, d), contiguous view
        return self.up[: self.routed_width].view(self.num_experts, self.bottleneck, self.dim)

    def fused_up(self) -> Tensor:
        """``[up; up_b]``: [(E+S)*b + E+S, d], concatenated per call (cached while no gradient is recorded)."""
        return cached_cat(self, "_fused_up_cache", (self.up, self.up_b), dim=0)

    def shared_forward(self, x: Tensor) -> Tensor:
        """Sum of the shared experts (one fused bottleneck of width S*b); zeros when there are none."""
        if self.num_shared == 0:
            return x.new_zeros(x.shape[0], self.dim)
        w = self.routed_width
        h = F.gelu(torch.addmm(self.down_b[w:], x, self.down[:, w:]))
        return torch.addmm(self.up_b[self.num_experts:].sum(0), h, self.up[w:])

    def forward(self, x: Tensor, topk_idx: Tensor, topk_weight: Tensor, backend: str = "dense") -> Tensor:
        return experts_forward(self, x, topk_idx, topk_weight, backend)


# ------------------------------------------------------------------------------------------------------------------
# backends: (experts, x [N, d], topk_idx [N, k], topk_weight [N, k]) -> shared(x) + sum_k w_k * E_{idx_k}(x)  [N, d]


def dense_from_hidden(ex: MoMEExperts, h: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """The dense backend after the down-projection: ``h`` [N, (E+S)*b] is every expert's pre-activation bottleneck.

    Each expert's GELU block is scaled by its gate (0 if unselected, 1 for shared experts); the gates themselves are
    appended as extra columns so that the gated output biases ride in the same matmul as the up-projections.
    """
    n, E, S, b = h.shape[0], ex.num_experts, ex.num_shared, ex.bottleneck
    gates = torch.zeros(n, E, dtype=h.dtype, device=h.device).scatter(1, idx, w.to(h.dtype))  # [N, E] sparse
    if S:
        gates = torch.cat([gates, gates.new_ones(n, S)], dim=1)  # shared experts: weight 1
    z = (F.gelu(h).view(n, E + S, b) * gates.unsqueeze(-1)).view(n, (E + S) * b)
    return torch.cat([z, gates], dim=1) @ ex.fused_up()  # [N, (E+S)*(b+1)] @ [(E+S)*(b+1), d]


def _dense(ex: MoMEExperts, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    return dense_from_hidden(ex, torch.addmm(ex.down_b, x, ex.down), idx, w)


def _grouped_mm(ex: MoMEExperts, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    n, k = idx.shape
    E = ex.num_experts
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # token-slots sorted by expert
    token = order // k
    counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)  # group ends; no host sync
    expert = flat[order]
    h = torch._grouped_mm(x[token], ex.routed_down(), offs=offs) + ex.routed_down_b()[expert]
    y = torch._grouped_mm(F.gelu(h), ex.routed_up(), offs=offs)
    y = y * w.reshape(-1)[order].to(y.dtype).unsqueeze(1)
    gates = torch.zeros(n, E, dtype=x.dtype, device=x.device).scatter(1, idx, w.to(x.dtype))
    out = ex.shared_forward(x) + gates @ ex.up_b[:E]  # shared experts + the routed experts' gated biases
    return out.index_add_(0, token, y)


def _loop(ex: MoMEExperts, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """Reference: every expert on its own, exactly as the formula reads."""
    b, E = ex.bottleneck, ex.num_experts
    out = torch.zeros_like(x)
    for s in range(ex.num_shared):
        cols = slice((E + s) * b, (E + s + 1) * b)
        h = F.gelu(x @ ex.down[:, cols] + ex.down_b[cols])
        out += h @ ex.up[cols] + ex.up_b[E + s]
    for e in range(E):
        token, slot = torch.where(idx == e)
        if token.numel() == 0:
            continue
        cols = slice(e * b, (e + 1) * b)
        h = F.gelu(x[token] @ ex.down[:, cols] + ex.down_b[cols])
        y = (h @ ex.up[cols] + ex.up_b[e]) * w[token, slot].to(x.dtype).unsqueeze(1)
        out.index_add_(0, token, y)
    return out


BACKENDS: Dict[str, Callable[[MoMEExperts, Tensor, Tensor, Tensor], Tensor]] = {
    "dense": _dense,
    "grouped_mm": _grouped_mm,
    "loop": _loop,
}

# Fastest backend per device type, from benchmarks/moe_layer.py (fwd and fwd+bwd at the paper and demo shapes and
# at decoding size). CPU: measured, dense wins everywhere (numbers in that file). CUDA: not measured yet (no GPU was
# available); dense has no host sync and only large ops, and torch's grouped_mm wants bf16 on SM80+ there.
AUTO_BACKEND: Dict[str, str] = {"cpu": "dense", "cuda": "dense"}


def resolve_backend(name: str, device: torch.device | str) -> str:
    if name == "auto":
        return AUTO_BACKEND.get(torch.device(device).type, "dense")
    if name not in BACKENDS:
        raise ValueError(f"unknown MoME expert backend '{name}'; choose auto or one of {', '.join(BACKENDS)}")
    return name


def experts_forward(experts: MoMEExperts, x: Tensor, topk_idx: Tensor, topk_weight: Tensor,
                    backend: str = "auto") -> Tensor:
    """Shared experts plus the gated routed experts for ``x`` [N, d]; see the module docstring for backends."""
    name = resolve_backend(backend, x.device)
    if name == "grouped_mm" and any(n * x.element_size() % 16 for n in (x.shape[1], experts.bottleneck)):
        raise ValueError(f"grouped_mm backend needs rows of 16 bytes multiples (hidden size and bottleneck); got "
                         f"d={x.shape[1]}, b={experts.bottleneck} in {x.dtype}; use backend=dense")
    return BACKENDS[name](experts, x, topk_idx, topk_weight)
