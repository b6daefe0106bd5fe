"""LoRA baselines on the frozen LLM's attention projections (MOME.md §2.8, §5; DECISIONS.md "Baselines").

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
backward; no ``set_adapter`` loop). The scale ids reach them as a tensor: the HF model passes the
``mome_scale_ids`` forward kwarg down to every attention module, and a forward pre-hook on that attention module
hands the tensor to its wrapped projections for the duration of that one call only (it is cleared by the forward
hook, and gradient-checkpoint recomputation re-enters the same hooks with the same kwargs).
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mome.models.hf_compat import allow_generate_kwargs

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

    def __init__(self, base: nn.Module, num_scales: int, rank: int, scaling: float, dropout: float = 0.0):
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
        self.scale_ids: Optional[torch.Tensor] = None  # bound for one attention call by the parent's hooks

    def extra_repr(self) -> str:
        return f"num_scales={self.num_scales}, rank={self.rank}, scaling={self.scaling}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ids = self.scale_ids
        if ids is None:
            raise RuntimeError(
                "scale-specific LoRA called without scale ids: call the LLM with the mome_scale_ids=LongTensor[B] kwarg"
            )
        if ids.shape[0] != x.shape[0]:
            raise RuntimeError(f"mome_scale_ids has {ids.shape[0]} rows but the input has {x.shape[0]}")
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


def _bind_scale_ids(module, args, kwargs):
    ids = kwargs.pop("mome_scale_ids", None)  # the attention kernels never see it
    for lin in module._scale_loras:
        lin.scale_ids = ids
    return args, kwargs


def _unbind_scale_ids(module, args, output):
    for lin in module._scale_loras:
        lin.scale_ids = None


def add_scale_lora(llm: nn.Module, lora_cfg, num_scales: int) -> List[ScaleLoRALinear]:
    """Wrap every target projection in a ``ScaleLoRALinear`` with ``num_scales`` adapters (in place)."""
    rank = lora_rank(llm.config.hidden_size, lora_cfg)
    wrapped = []
    parents: Dict[int, nn.Module] = {}
    for parent, name, proj in _target_linears(llm, lora_cfg.target_modules):
        lin = ScaleLoRALinear(proj, num_scales, rank, lora_scaling(lora_cfg), lora_cfg.dropout)
        setattr(parent, name, lin)
        wrapped.append(lin)
        if id(parent) not in parents:
            parents[id(parent)] = parent
            parent._scale_loras = []  # a plain list: the wrappers are registered once, where they replace the proj
            parent.register_forward_pre_hook(_bind_scale_ids, with_kwargs=True)
            parent.register_forward_hook(_unbind_scale_ids)
        parent._scale_loras.append(lin)
    allow_generate_kwargs(llm, ("mome_scale_ids",))
    return wrapped


def scale_lora_modules(llm: nn.Module) -> Iterator[ScaleLoRALinear]:
    return (m for m in llm.modules() if isinstance(m, ScaleLoRALinear))


def add_method_lora(llm: nn.Module, method: str, lora_cfg, num_scales: int) -> None:
    """Install the adapters of a LoRA baseline; everything else in ``llm`` stays frozen."""
    if method in ("llama_avsr", "mtsk_ms", "mtsk_mss"):
        add_global_lora(llm, lora_cfg)
    if method in ("mtsk_ss", "mtsk_mss"):
        add_scale_lora(llm, lora_cfg, num_scales)
    if method not in ("llama_avsr", "mtsk_ms", "mtsk_ss", "mtsk_mss"):
        raise ValueError(f"'{method}' is not a LoRA method")


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
