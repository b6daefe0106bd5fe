"""Attach MoME modules to a frozen Hugging Face Llama-family model, without editing or copying its modeling code.

Usage::

    handle = inject_mome(llm, cfg.model.mome, num_scales=len(all_scales(cfg.model)))
    self.mome = handle.modules                  # register the trainable modules on your own nn.Module
    out = llm(inputs_embeds=x, attention_mask=am,
              mome_scale_ids=scale_ids,          # LongTensor [B]: scale id of each row (default: all 0)
              mome_token_mask=real_tokens)       # BoolTensor [B, S]: False = padding (default: all real)
    aux = handle.pop_aux()                      # {"lb", "z", "expert_load" [L, E], "load_cv" [L], ...}
    loss = ce + cfg.model.mome.lb_coef * aux["lb"] + cfg.model.mome.z_coef * aux["z"]
    with handle.record_routing() as trace:      # analysis: per layer, per forward call, the routing of every token
        llm.generate(..., mome_scale_ids=scale_ids)
    trace.layers[l][c].topk_idx                 # [B, S, k]; also .gates, .probs, .scale_ids, .token_mask

How it attaches (transformers 5.x, tested on the locked release and the newest; LlamaForCausalLM and
Qwen2ForCausalLM). Names internal to transformers or torch are read only through ``mome.models.hf_compat``:

* The two ``mome_*`` tensors are ordinary forward kwargs. HF passes unknown ``**kwargs`` from ``XForCausalLM`` through
  the base model to every decoder layer and on to ``self_attn``; ``generate()`` forwards them at every step and
  ``repeat_interleave``-s tensor kwargs for beams (its kwargs validation is told to let the two names pass, on this
  model instance only: ``hf_compat.allow_generate_kwargs``). A forward pre-hook on each ``self_attn`` removes them
  (the attention kernels never see them) and keeps them for the rest of that layer call. No module attribute holds a "current scale" between forward and
  backward.
* Placements: ``mhsa``: a forward hook on ``self_attn`` adds ``MoME(u)`` to the attention output,
  ``u`` = the attention's (normed) input; ``ffn``: the same on ``mlp``; ``layer``: a forward hook on the decoder
  layer adds ``MoME(h)`` to its output, ``h`` = the layer input. The frozen modules and their weights are untouched;
  ``handle.remove()`` detaches everything.
* Gradient checkpointing: transformers 5.x checkpoints decoder-layer ``forward`` (not ``__call__``), so the
  ``self_attn``/``mlp`` hooks run inside the checkpoint and are recomputed in backward from the checkpoint's saved
  kwargs (correct scale ids even after several forwards), while the ``layer`` hooks run outside it. Auxiliary losses
  are computed in the recomputation too (so the saved-tensor sequence matches) but recorded only once.
* KV cache: at each new token MoME runs on that token. ``mome_token_mask`` may keep the prompt's length during
  ``generate()``: tokens past its end (generated ones) count as real. Which tokens a call adds is decided from the
  shapes (the mask's length against the call's new tokens) and checked against the cache where the call carries one
  (under any of the names transformers has used for it: ``hf_compat.cached_length``).

Aux losses (``pop_aux``, see ``mome.layers.losses``): Switch LB ``N_r * sum_e f_e P_e`` with ``sum_e f_e = k`` (value
k at perfect balance; ``lb_topk_normalize`` divides by k), computed per (layer, scale) over the real tokens of each
forward call and averaged over all (layer, scale) pairs seen since the last ``pop_aux``. Aux losses are computed
only while the MoME modules are in training mode (fresh modules are, as any ``nn.Module``); in eval mode
``pop_aux`` returns zeros. The z-loss is computed only when ``z_coef > 0``. Expert compute backends (``backend``):
see ``mome.layers.experts``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

from mome.layers.layer import MoMELayer
from mome.models.hf_compat import allow_generate_kwargs, cached_length, disallow_generate_kwargs, in_backward
from mome.layers.losses import (coefficient_of_variation, expert_load, load_balancing_from_stats, router_z_loss,
                                routing_stats)

MOME_KWARGS = ("mome_scale_ids", "mome_token_mask")
PLACEMENTS = ("mhsa", "ffn", "layer")


@dataclass
class RoutingRecord:
    """Routing of one forward call in one layer (all detached)."""

    topk_idx: Tensor  # [B, S, k]
    gates: Tensor  # [B, S, k]
    probs: Tensor  # [B, S, E]
    scale_ids: Tensor  # [B]
    token_mask: Tensor  # [B, S] bool (all True where no mask was given or for generated tokens)


@dataclass
class RoutingTrace:
    """``layers[l]`` lists the ``RoutingRecord`` of every forward call (prefill, then one per generated token)."""

    layers: List[List[RoutingRecord]]

    @property
    def num_calls(self) -> int:
        return len(self.layers[0]) if self.layers else 0


@dataclass
class _Call:
    """What one decoder-layer call needs to know: set and read within the same call."""

    scale_ids: Tensor  # [B]
    token_mask: Optional[Tensor]  # [B, S] or None (all real)


@dataclass
class _AuxRecord:
    layer: int
    lb: Tensor  # [G]
    z: Tensor  # [G]
    tokens: Tensor  # [G]
    counts: Tensor  # [G, E]


def _decoder_layers(llm: nn.Module) -> nn.ModuleList:
    base = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, "model", llm)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"inject_mome: {type(llm).__name__} has no decoder layers at .model.layers; "
                        "only Llama-family causal LMs (Llama, Qwen2, ...) are supported")
    for i, layer in enumerate(layers):
        for name in ("self_attn", "mlp"):
            if not isinstance(getattr(layer, name, None), nn.Module):
                raise TypeError(f"inject_mome: decoder layer {i} ({type(layer).__name__}) has no '{name}' module; "
                                "only Llama-family decoder layers are supported")
    return layers


def _new_token_mask(mask: Tensor, new: int, past: Optional[int], layer_idx: int) -> Optional[Tensor]:
    """The part of the caller's token mask ``[B, P]`` that covers this call's ``new`` tokens.

    The mask covers the prompt (or a whole training sequence). A call whose new tokens are the whole mask is a
    prefill or a full forward; a call after the prompt (a decoding step: fewer new tokens than the mask, or a cache
    as long as the mask) sees generated tokens, which are real (None). The number of cached tokens, where the call
    carries a cache, only sharpens the check; without it the shapes alone decide.
    """
    P = mask.shape[1]
    if past is None:
        if P == new:
            return mask
        if new < P:
            return None
    else:
        if P == past + new:
            return mask[:, past:]
        if past > 0 and P <= past:
            return None
    raise ValueError(f"mome_token_mask has {P} positions but layer {layer_idx} sees {new} new tokens"
                     + (f" after {past} cached ones" if past is not None else ""))


class MoMEHandle:
    """The MoME modules attached to one LLM, their hooks, and what they collected.

    ``modules``: ``nn.ModuleList`` of one ``MoMELayer`` per decoder layer (register it on your model so that
    ``.to()``, ``.train()``, optimisers and checkpoints see it).
    """

    def __init__(self, llm: nn.Module, cfg, num_scales: int, modules: nn.ModuleList):
        self.llm, self.cfg, self.num_scales, self.modules = llm, cfg, num_scales, modules
        self.placement: str = cfg.placement
        self.lb_topk_normalize: bool = bool(getattr(cfg, "lb_topk_normalize", False))
        self.compute_z: bool = float(getattr(cfg, "z_coef", 0.0)) > 0
        self._calls: List[Optional[_Call]] = [None] * len(modules)
        self._aux: List[_AuxRecord] = []
        self._trace: Optional[RoutingTrace] = None
        self._hooks: list = []

    # public API -------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.modules)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.modules.parameters() if p.requires_grad]

    def pop_aux(self) -> Dict[str, Optional[Tensor]]:
        """Aux losses and load statistics of every forward since the last call; clears them.

        ``lb``, ``z``: scalars averaged over (layer, scale) pairs; ``lb_per_layer`` [L]; ``expert_load`` [L, E]
        fraction of routed token-slots per expert (detached); ``load_cv`` [L] its coefficient of variation;
        ``layer_calls``: how many (layer, forward) records went in. Zeros / None when nothing was recorded.
        """
        records, self._aux = self._aux, []
        dev = self.modules[0].experts.down.device
        if not records:
            zero = torch.zeros((), device=dev)
            return {"lb": zero, "z": zero, "lb_per_layer": None, "expert_load": None, "load_cv": None,
                    "layer_calls": 0}
        lb = torch.stack([r.lb for r in records])  # [R, G]
        z = torch.stack([r.z for r in records])
        present = torch.stack([r.tokens for r in records]) > 0
        pairs = present.sum().clamp_min(1)
        E = records[0].counts.shape[-1]
        counts = torch.zeros(self.num_layers, E, device=dev)
        tokens = torch.zeros(self.num_layers, device=dev)
        lb_layer = torch.zeros(self.num_layers, device=dev)
        pairs_layer = torch.zeros(self.num_layers, device=dev)
        for r in records:
            counts[r.layer] += r.counts.detach().sum(0)
            tokens[r.layer] += r.tokens.detach().sum()
            lb_layer[r.layer] += (r.lb.detach() * (r.tokens > 0)).sum()
            pairs_layer[r.layer] += (r.tokens > 0).sum()
        load = expert_load(counts, tokens, self.modules[0].top_k)
        return {
            "lb": (lb * present).sum() / pairs,
            "z": (z * present).sum() / pairs,
            "lb_per_layer": lb_layer / pairs_layer.clamp_min(1),
            "expert_load": load,
            "load_cv": coefficient_of_variation(load),
            "layer_calls": len(records),
        }

    @contextlib.contextmanager
    def record_routing(self) -> Iterator[RoutingTrace]:
        """Within the block, every forward call appends each layer's routing to the yielded trace."""
        trace = RoutingTrace(layers=[[] for _ in range(self.num_layers)])
        previous, self._trace = self._trace, trace
        try:
            yield trace
        finally:
            self._trace = previous

    def remove(self) -> None:
        """Detach every hook; the LLM is back to its original behaviour."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self.llm, "_mome_handle", None) is self:
            del self.llm._mome_handle
            disallow_generate_kwargs(self.llm, MOME_KWARGS)

    # internals --------------------------------------------------------------------------------------------------
    def _resolve_call(self, hidden: Tensor, kwargs: dict, layer_idx: int, pop: bool) -> _Call:
        get = kwargs.pop if pop else kwargs.get
        scale_ids, mask = get("mome_scale_ids", None), get("mome_token_mask", None)
        B, S = hidden.shape[:2]
        if scale_ids is None:
            scale_ids = torch.zeros(B, dtype=torch.long, device=hidden.device)
        else:
            if not isinstance(scale_ids, Tensor) or scale_ids.shape != (B,):
                raise ValueError(f"mome_scale_ids must be a LongTensor of shape [batch={B}], got "
                                 f"{getattr(scale_ids, 'shape', type(scale_ids))}")
            scale_ids = scale_ids.to(device=hidden.device, dtype=torch.long)
            if scale_ids.device.type == "cpu" and B and not (0 <= int(scale_ids.min()) and
                                                             int(scale_ids.max()) < self.num_scales):
                raise ValueError(f"mome_scale_ids {scale_ids.tolist()} out of range for {self.num_scales} scales")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != B:
                raise ValueError(f"mome_token_mask must be a BoolTensor [batch={B}, seq], got "
                                 f"{getattr(mask, 'shape', type(mask))}")
            mask = _new_token_mask(mask, S, cached_length(kwargs, layer_idx), layer_idx)
            if mask is not None:
                mask = mask.to(device=hidden.device, dtype=torch.bool)
        return _Call(scale_ids=scale_ids, token_mask=mask)

    def _apply(self, layer_idx: int, u: Tensor, call: Optional[_Call]) -> Tensor:
        if call is None:  # the layer was called without going through self_attn's pre-hook
            raise RuntimeError(f"MoME layer {layer_idx}: no call context (unexpected decoder-layer structure)")
        module: MoMELayer = self.modules[layer_idx]
        y, routing = module(u, call.scale_ids)
        aux = None
        if module.training:  # computed in checkpoint recomputation too, so saved tensors match; recorded once
            counts, psum, tokens = routing_stats(routing.probs, routing.topk_idx, call.scale_ids, self.num_scales,
                                                 call.token_mask)
            lb = load_balancing_from_stats(counts, psum, tokens, module.top_k, self.lb_topk_normalize)
            z = (router_z_loss(routing.logits, call.scale_ids, self.num_scales, call.token_mask)[0]
                 if self.compute_z else torch.zeros_like(lb))
            aux = _AuxRecord(layer_idx, lb, z, tokens.detach(), counts.detach())
        if not in_backward():
            if aux is not None:
                self._aux.append(aux)
            if self._trace is not None:
                mask = call.token_mask
                if mask is None:
                    mask = torch.ones(u.shape[:2], dtype=torch.bool, device=u.device)
                self._trace.layers[layer_idx].append(RoutingRecord(
                    topk_idx=routing.topk_idx.detach(), gates=routing.topk_weight.detach(),
                    probs=routing.probs.detach(), scale_ids=call.scale_ids.detach(), token_mask=mask.detach()))
        return y

    def _install(self, layers: nn.ModuleList) -> None:
        for i, layer in enumerate(layers):
            self._hooks.append(layer.self_attn.register_forward_pre_hook(self._attn_pre_hook(i), with_kwargs=True))
            if self.placement == "mhsa":
                self._hooks.append(layer.self_attn.register_forward_hook(self._attn_hook(i), with_kwargs=True))
            elif self.placement == "ffn":
                self._hooks.append(layer.mlp.register_forward_hook(self._mlp_hook(i)))
            else:
                self._hooks.append(layer.register_forward_pre_hook(self._layer_pre_hook(i), with_kwargs=True))
                self._hooks.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))

    @staticmethod
    def _hidden(args: tuple, kwargs: dict) -> Tensor:
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _attn_pre_hook(self, i: int):
        def hook(module, args, kwargs):
            call = self._resolve_call(self._hidden(args, kwargs), kwargs, i, pop=True)
            if self.placement != "layer":
                self._calls[i] = call
            return args, kwargs
        return hook

    def _attn_hook(self, i: int):
        def hook(module, args, kwargs, output):
            y = self._apply(i, self._hidden(args, kwargs), self._calls[i])
            self._calls[i] = None
            if isinstance(output, tuple):
                return (output[0] + y,) + tuple(output[1:])
            return output + y
        return hook

    def _mlp_hook(self, i: int):
        def hook(module, args, output):
            y = self._apply(i, args[0], self._calls[i])
            self._calls[i] = None
            return output + y
        return hook

    def _layer_pre_hook(self, i: int):
        def hook(module, args, kwargs):
            # resolved before the layer writes its KV cache (the cached length must exclude the new tokens)
            self._calls[i] = self._resolve_call(self._hidden(args, kwargs), kwargs, i, pop=False)
        return hook

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs, output):
            y = self._apply(i, self._hidden(args, kwargs), self._calls[i])
            self._calls[i] = None
            if isinstance(output, tuple):
                return (output[0] + y,) + tuple(output[1:])
            return output + y
        return hook


def inject_mome(llm: nn.Module, cfg, num_scales: int = 1, dtype: torch.dtype = torch.float32) -> MoMEHandle:
    """Attach one MoME module per decoder layer of ``llm`` (a Llama-family ``XForCausalLM``) and return the handle.

    ``cfg`` is a ``MoMEConfig`` (``cfg.model.mome``); ``num_scales`` is the number of scale ids (``len(all_scales)``),
    used for per-scale losses and the per-scale routers. The MoME parameters are created in ``dtype`` on the LLM's
    device; the LLM's own parameters are not touched (freeze them yourself).
    """
    if cfg.placement not in PLACEMENTS:
        raise ValueError(f"model.mome.placement is '{cfg.placement}'; choose one of {', '.join(PLACEMENTS)}")
    if num_scales < 1:
        raise ValueError(f"inject_mome: num_scales must be >= 1, got {num_scales}")
    if getattr(llm, "_mome_handle", None) is not None:
        raise RuntimeError("inject_mome: this model already has MoME modules; call handle.remove() first")
    layers = _decoder_layers(llm)
    dim = llm.config.hidden_size
    device = next(llm.parameters()).device
    modules = nn.ModuleList([MoMELayer.from_config(dim, cfg, num_scales) for _ in layers]).to(device=device, dtype=dtype)
    handle = MoMEHandle(llm, cfg, num_scales, modules)
    handle._install(layers)
    allow_generate_kwargs(llm, MOME_KWARGS)  # generate() forwards the two mome_* kwargs to every step
    llm._mome_handle = handle
    return handle
