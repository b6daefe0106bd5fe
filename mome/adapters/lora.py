"""LoRA baselines on the frozen LLM's attention projections (Llama-AVSR, Llama-MTSK; docs/method.md#baselines, docs/decisions.md#lora).

Conventions of Llama-AVSR / Llama-MTSK: LoRA on ``q_proj`` and ``v_proj`` (``model.lora.target_modules``), rank
``round(hidden / reduction)`` (unless ``model.lora.rank`` > 0) and scaling ``alpha / reduction`` (not alpha / rank):
``reduction=32, alpha=4`` gives rank 96 and scaling 0.125 on Llama-3.2-3B. The initial update is zero (PEFT's
default init: A Kaiming-uniform, B zeros; the reference code swaps the two, which is also zero at start).

Methods:

* ``llama_avsr`` / ``mtsk_ms``: one global adapter, made with PEFT (``inject_adapter_in_model``), adapter name
  ``global``. The LLM stays a plain HF model, so ``generate`` works unchanged.
* ``mtsk_ss``: one adapter per Matryoshka scale, selected per row by its scale id.
* ``mtsk_mss``: the global PEFT adapter plus the per-scale ones, summed.

Per-scale adapters are ``ScaleLoRALinear`` wrappers around the projection (a fixed one-hot "router" by scale id,
computed for all scales at once and masked, so every scale present in a batch gets its gradient in the same single
backward; no ``set_adapter`` loop). They read the scale of each row from the ``AdapterCall`` bound around the LLM
call (``with adapters.call(scale_ids): llm(...)``, see ``mome.adapters.context``), so ``generate`` and gradient
checkpointing (with ``adapters.checkpoint_kwargs()``) need nothing else.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mome.adapters.context import AdapterSet, CallSlot
from mome.config import GLOBAL_LORA_METHODS, LORA_METHODS, SCALE_LORA_METHODS

GLOBAL_ADAPTER = "global"


def lora_rank(hidden: int, lora_cfg) -> int:
    rank = lora_cfg.rank if lora_cfg.rank > 0 else round(hidden / lora_cfg.reduction)
    if rank < 1:
        raise ValueError(f"LoRA rank {rank} for hidden size {hidden} (model.lora.reduction={lora_cfg.reduction})")
    return rank


def lora_scaling(lora_cfg) -> float:
    return lora_cfg.alpha / lora_cfg.reduction


def _target_linears(llm: nn.Module, targets) -> List[Tuple[nn.Module, str, nn.Module]]:
    """(parent module, attribute name, projection) for every target projection in the LLM."""
    found = []
    for parent in llm.modules():
        for name in targets:
            child = getattr(parent, name, None)
            if isinstance(child, nn.Module) and not isinstance(child, ScaleLoRALinear):
                found.append((parent, name, child))
    if not found:
        raise ValueError(f"no modules named {list(targets)} in {type(llm).__name__}; check model.lora.target_modules")
    return found


# ----------------------------------------------------------------------------------------------------------------
# global adapter (PEFT)


def add_global_lora(llm: nn.Module, lora_cfg) -> None:
    """Inject one PEFT LoRA adapter named ``global`` into ``llm`` (in place; only adapter weights train)."""
    from peft import LoraConfig, inject_adapter_in_model

    rank = lora_rank(llm.config.hidden_size, lora_cfg)
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_scaling(lora_cfg) * rank,  # PEFT scales by lora_alpha / r
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        bias="none",
    )
    inject_adapter_in_model(config, llm, adapter_name=GLOBAL_ADAPTER)
    for name, p in llm.named_parameters():
        is_adapter = f".{GLOBAL_ADAPTER}." in name and "lora_" in name
        p.requires_grad_(is_adapter)
        if is_adapter and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 adapter weights on a bf16 LLM (PEFT casts inputs and outputs)


# ----------------------------------------------------------------------------------------------------------------
# per-scale adapters


class ScaleLoRALinear(nn.Module):
    """``base(x) + scaling * B_s A_s x`` where ``s`` is each row's scale id.

    ``lora_A`` [n_scales, r, d_in] (Kaiming-uniform), ``lora_B`` [n_scales, d_out, r] (zeros). All scales are
    computed in one matmul and masked by the row's one-hot scale, so there is no per-scale Python loop and every
    scale present in the batch receives gradient.
    """

    def __init__(self, base: nn.Module, num_scales: int, rank: int, scaling: float, dropout: float = 0.0,
                 slot: Optional[CallSlot] = None):
        super().__init__()
        self.base = base
        d_in, d_out = _linear_dims(base)
        w = base_weight(base)
        self.lora_A = nn.Parameter(torch.empty(num_scales, rank, d_in, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(num_scales, d_out, rank, device=w.device))
        if not self.lora_A.is_meta:
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.num_scales, self.rank, self.scaling = num_scales, rank, scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.slot = slot if slot is not None else CallSlot(num_scales)  # where the bound call's scale ids are

    def extra_repr(self) -> str:
        return f"num_scales={self.num_scales}, rank={self.rank}, scaling={self.scaling}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ids = self.slot.get("scale-specific LoRA").rows(x, "scale-specific LoRA")
        n, r = self.num_scales, self.rank
        a = self.lora_A.reshape(n * r, -1).to(x.dtype)
        h = F.linear(self.dropout(x), a)  # [B, S, n*r]: every scale's down-projection at once
        gate = F.one_hot(ids, n).to(h.dtype)  # [B, n]
        h = (h.unflatten(-1, (n, r)) * gate[:, None, :, None]).flatten(-2)
        b = self.lora_B.permute(1, 0, 2).reshape(-1, n * r).to(x.dtype)  # [d_out, n*r]
        return out + self.scaling * F.linear(h, b)


def base_weight(module: nn.Module) -> torch.Tensor:
    base = getattr(module, "base_layer", module)  # a PEFT LoRA layer wraps the original Linear
    return base.weight


def _linear_dims(module: nn.Module) -> Tuple[int, int]:
    w = base_weight(module)
    return w.shape[1], w.shape[0]


def add_scale_lora(llm: nn.Module, lora_cfg, slot: CallSlot) -> List[ScaleLoRALinear]:
    """Wrap every target projection in a ``ScaleLoRALinear`` with one adapter per scale of ``slot`` (in place)."""
    rank = lora_rank(llm.config.hidden_size, lora_cfg)
    wrapped = []
    for parent, name, proj in _target_linears(llm, lora_cfg.target_modules):
        lin = ScaleLoRALinear(proj, slot.num_scales, rank, lora_scaling(lora_cfg), lora_cfg.dropout, slot=slot)
        setattr(parent, name, lin)
        wrapped.append(lin)
    return wrapped


def scale_lora_modules(llm: nn.Module) -> Iterator[ScaleLoRALinear]:
    return (m for m in llm.modules() if isinstance(m, ScaleLoRALinear))


class LoRAAdapters(AdapterSet):
    """The LoRA adapters of one baseline method in one LLM; ``call`` binds the per-row scale ids that
    scale-specific adapters read (the global adapter needs none, so ``call`` is optional for it)."""

    def __init__(self, method: str, num_scales: int):
        super().__init__(num_scales)
        self.method = method
        self.scale_specific = method in SCALE_LORA_METHODS


def add_method_lora(llm: nn.Module, method: str, lora_cfg, num_scales: int) -> LoRAAdapters:
    """Install the adapters of a LoRA baseline; everything else in ``llm`` stays frozen."""
    if method not in LORA_METHODS:
        raise ValueError(f"'{method}' is not a LoRA method; choose one of {', '.join(LORA_METHODS)}")
    adapters = LoRAAdapters(method, num_scales)
    if method in GLOBAL_LORA_METHODS:
        add_global_lora(llm, lora_cfg)
    if adapters.scale_specific:
        add_scale_lora(llm, lora_cfg, adapters.slot)
    return adapters


def lora_parameter_counts(llm: nn.Module) -> Dict[str, int]:
    """Adapter parameters: ``trainable`` (all adapters) and ``active`` (what one scale uses at inference: the
    global adapter plus one scale's adapter)."""
    scale_total = scale_active = 0
    for m in scale_lora_modules(llm):
        n = m.lora_A.numel() + m.lora_B.numel()
        scale_total += n
        scale_active += n // m.num_scales
    global_total = sum(p.numel() for k, p in llm.named_parameters() if f".{GLOBAL_ADAPTER}." in k and "lora_" in k)
    return {"trainable": scale_total + global_total, "active": scale_active + global_total}
