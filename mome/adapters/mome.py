"""MoME inside a frozen Hugging Face Llama-family LLM: one ``MoMELayer`` per decoder layer, added to the residual
stream by a wrapper module that replaces the sublayer of the configured placement.

Usage::

    adapters = attach_mome(llm, num_scales=4, placement="mhsa", layer_args=dict(num_experts=23, top_k=4, ...))
    self.mome = adapters.modules              # register the trainable modules on your own nn.Module
    with adapters.call(scale_ids, token_mask=real_tokens) as call:   # scale_ids LongTensor [B]; mask [B, S]
        out = llm(inputs_embeds=x, attention_mask=am)
    aux = adapters.aux_losses(call)           # {"lb", "z", "expert_load" [L, E], "load_cv" [L], ...}
    with adapters.call(scale_ids, trace=True) as call:                 # routing of every token, every layer
        llm.generate(inputs_embeds=x, attention_mask=am, ...)
    call.trace.layers[l][c].topk_idx          # [B, S, k]; also .gates, .probs, .scale_ids, .token_mask

Where MoME adds to the residual stream (``placement``), in each decoder layer:

* ``mhsa``: ``self_attn`` becomes ``MoMEAttention``: ``attn(u) + MoME(u)``, ``u`` = the attention's (normed) input;
* ``ffn``: ``mlp`` becomes ``MoMEMLP``: ``mlp(u) + MoME(u)``;
* ``layer``: the decoder layer becomes ``MoMEDecoderLayer``: ``layer(h) + MoME(h)``, ``h`` = the layer input.

The frozen modules and their weights are untouched inside the wrappers; ``adapters.remove()`` puts the original
modules back. The ``MoMELayer`` modules are registered once, on whoever owns ``adapters.modules`` (their parameter
names do not depend on the placement); the wrappers refer to them.

The scale of each row and the real-token mask reach the wrappers through the ``AdapterCall`` bound by
``adapters.call`` (see ``mome.adapters.context``), never through the LLM's forward kwargs; ``generate`` runs
unchanged inside the block (beam rows are expanded from the call's rows). The token mask is needed only for the
load-balancing statistics and routing traces; without one every token counts as real. Gradient checkpointing: enable
it with ``hf_compat.enable_checkpointing(llm, adapters.checkpoint_kwargs())`` so that a recomputed layer sees the
call it was first run with.

Aux losses (``aux_losses``, see ``mome.layers.losses``): Switch LB ``N_r * sum_e f_e P_e`` with ``sum_e f_e = k``
(value k at perfect balance; ``lb_topk_normalize`` divides by k), computed per (layer, scale) over the real tokens of
each forward and averaged over all (layer, scale) pairs of the call. They are computed only while the MoME modules
are in training mode (also in a checkpoint recomputation, so that it saves the same tensors, but recorded once); in
eval mode ``aux_losses`` returns zeros. The z-loss is computed only when ``z_coef > 0``. Expert compute backends:
see ``mome.layers.experts``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from mome.adapters.context import AdapterCall, AdapterSet, RoutingRecord
from mome.config import PLACEMENTS
from mome.layers.layer import MoMELayer
from mome.layers.losses import expert_load, load_balancing_from_stats, router_z_loss, routing_stats
from mome.metrics.load import coefficient_of_variation



@dataclass
class _AuxRecord:
    layer: int
    lb: Tensor  # [G]
    z: Tensor  # [G]
    tokens: Tensor  # [G]
    counts: Tensor  # [G, E]


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family ``XForCausalLM`` (each with ``self_attn`` and ``mlp``)."""
    base = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, "model", llm)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"{type(llm).__name__} has no decoder layers at .model.layers; "
                        "only Llama-family causal LMs (Llama, Qwen2, ...) are supported")
    for i, layer in enumerate(layers):
        inner = layer.layer if isinstance(layer, MoMEDecoderLayer) else layer
        for name in ("self_attn", "mlp"):
            if not isinstance(getattr(inner, name, None), nn.Module):
                raise TypeError(f"decoder layer {i} ({type(inner).__name__}) has no '{name}' module; "
                                "only Llama-family decoder layers are supported")
    return layers


class _Site:
    """What a wrapper needs to apply MoME in its layer: the layer index and the adapters (a plain object, so the
    ``MoMELayer`` is not registered a second time inside the LLM)."""

    def __init__(self, adapters: "MoMEAdapters", layer: int):
        self.adapters, self.layer = adapters, layer

    def __call__(self, u: Tensor) -> Tensor:
        return self.adapters._residual(self.layer, u)


def _add(output, y: Tensor):
    """``output + y`` for a sublayer output that is a tensor or a tuple whose first item is the hidden states."""
    if isinstance(output, tuple):
        return (output[0] + y,) + tuple(output[1:])
    return output + y


class _Wrapper(nn.Module):
    """Stands in for a frozen sublayer: ``sublayer(x, ...) + MoME(x)``, where ``x`` is the sublayer's input.

    Attributes the wrapper lacks are the sublayer's (``layer_idx``, ``config``, ...), so code that inspects the
    decoder sees what it expects."""

    inner_name = "inner"  # the attribute that holds the frozen sublayer

    def __init__(self, inner: nn.Module, site: _Site):
        super().__init__()
        setattr(self, self.inner_name, inner)
        self._site = site

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__(self.inner_name), name)

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        sublayer = getattr(self, self.inner_name)
        return _add(sublayer(hidden_states, *args, **kwargs), self._site(hidden_states))  # MoME joins the residual

    def extra_repr(self) -> str:
        return f"mome_layer={self._site.layer}"


class MoMEAttention(_Wrapper):
    """Placement ``mhsa``: the attention output plus MoME of the attention's (normed) input."""

    inner_name = "attention"


class MoMEMLP(_Wrapper):
    """Placement ``ffn``: the MLP output plus MoME of the MLP's input."""

    inner_name = "mlp"


class MoMEDecoderLayer(_Wrapper):
    """Placement ``layer``: the decoder layer's output plus MoME of its input."""

    inner_name = "layer"


class MoMEAdapters(AdapterSet):
    """The MoME modules attached to one LLM, the wrappers that apply them, and the per-call context.

    ``modules``: ``nn.ModuleList`` of one ``MoMELayer`` per decoder layer (register it on your model so that
    ``.to()``, ``.train()``, optimisers and checkpoints see it).
    """

    def __init__(self, llm: nn.Module, modules: nn.ModuleList, num_scales: int, placement: str,
                 lb_topk_normalize: bool = False, compute_z: bool = False):
        super().__init__(num_scales)
        self.llm, self.modules, self.placement = llm, modules, placement
        self.lb_topk_normalize, self.compute_z = lb_topk_normalize, compute_z
        self._originals: list = []  # (parent, attribute or index, original module)

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.modules.parameters() if p.requires_grad]

    def aux_losses(self, call: AdapterCall) -> Dict[str, Optional[Tensor]]:
        """Aux losses and load statistics of every forward made inside ``call``.

        ``lb``, ``z``: scalars averaged over (layer, scale) pairs; ``lb_per_layer`` [L]; ``expert_load`` [L, E]
        fraction of routed token-slots per expert (detached); ``load_cv`` [L] its coefficient of variation;
        ``layer_calls``: how many (layer, forward) records went in. Zeros / None when nothing was recorded.
        """
        records = call.aux
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

    def remove(self) -> None:
        """Put the original sublayers back; the LLM is back to its original behaviour."""
        for parent, key, original in reversed(self._originals):
            if isinstance(key, int):
                parent[key] = original
            else:
                setattr(parent, key, original)
        self._originals.clear()

    # internals --------------------------------------------------------------------------------------------------
    def _wrap(self, layers: nn.ModuleList) -> None:
        for i, layer in enumerate(layers):
            site = _Site(self, i)
            if self.placement == "mhsa":
                self._originals.append((layer, "self_attn", layer.self_attn))
                layer.self_attn = MoMEAttention(layer.self_attn, site)
            elif self.placement == "ffn":
                self._originals.append((layer, "mlp", layer.mlp))
                layer.mlp = MoMEMLP(layer.mlp, site)
            else:
                self._originals.append((layers, i, layer))
                layers[i] = MoMEDecoderLayer(layer, site)

    def _residual(self, layer_idx: int, u: Tensor) -> Tensor:
        """``MoME(u)`` of decoder layer ``layer_idx`` for the bound call; records its statistics and routing."""
        where = f"MoME layer {layer_idx}"
        call = self.slot.get(where)
        scale_ids = call.rows(u, where)
        mask = call.mask(layer_idx, u, where)
        module: MoMELayer = self.modules[layer_idx]
        y, routing = module(u, scale_ids)
        if module.training:  # computed in checkpoint recomputation too, so saved tensors match; recorded once
            counts, psum, tokens = routing_stats(routing.probs, routing.topk_idx, scale_ids, self.num_scales, mask)
            lb = load_balancing_from_stats(counts, psum, tokens, module.top_k, self.lb_topk_normalize)
            z = (router_z_loss(routing.logits, scale_ids, self.num_scales, mask)[0]
                 if self.compute_z else torch.zeros_like(lb))
            if call.records:
                call.aux.append(_AuxRecord(layer_idx, lb, z, tokens.detach(), counts.detach()))
        if call.trace is not None and call.records:
            if mask is None:
                mask = torch.ones(u.shape[:2], dtype=torch.bool, device=u.device)
            call.trace.layers[layer_idx].append(RoutingRecord(
                topk_idx=routing.topk_idx.detach(), gates=routing.topk_weight.detach(), probs=routing.probs.detach(),
                scale_ids=scale_ids.detach(), token_mask=mask.detach()))
        return y


def attach_mome(llm: nn.Module, num_scales: int, placement: str, layer_args: dict, lb_topk_normalize: bool = False,
                compute_z: bool = False, dtype: torch.dtype = torch.float32) -> MoMEAdapters:
    """Put one MoME module in every decoder layer of ``llm`` (a Llama-family ``XForCausalLM``) at ``placement``.

    ``layer_args``: ``MoMELayer`` arguments (``num_experts``, ``top_k``, ``num_shared``, ``bottleneck``,
    ``renormalize``, ``num_routers``, ``backend``); ``num_scales`` sizes the per-scale losses. The MoME parameters are
    created in ``dtype`` on the LLM's device; the LLM's own parameters are not touched (freeze them yourself).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"model.mome.placement is '{placement}'; choose one of {', '.join(PLACEMENTS)}")
    if num_scales < 1:
        raise ValueError(f"attach_mome: num_scales must be >= 1, got {num_scales}")
    if any(isinstance(m, _Wrapper) for m in llm.modules()):
        raise RuntimeError("attach_mome: this model already has MoME modules; call adapters.remove() first")
    layers = decoder_layers(llm)
    device = next(llm.parameters()).device
    modules = nn.ModuleList([MoMELayer(llm.config.hidden_size, **layer_args) for _ in layers]).to(device=device,
                                                                                                    dtype=dtype)
    adapters = MoMEAdapters(llm, modules, num_scales, placement, lb_topk_normalize, compute_z)
    adapters._wrap(layers)
    return adapters


def attach_mome_from_config(llm: nn.Module, mome_cfg, num_scales: int,
                            dtype: torch.dtype = torch.float32) -> MoMEAdapters:
    """``attach_mome`` with the settings of a ``MoMEConfig`` (``model.mome``), unpacked here into the scalars the
    MoME modules take (``lb_coef`` / ``z_coef`` weigh the losses in the model, not here)."""
    m = mome_cfg
    layer_args = dict(num_experts=int(m.num_experts), top_k=int(m.top_k), num_shared=int(m.num_shared),
                      bottleneck=int(m.bottleneck), renormalize=bool(m.renormalize),
                      num_routers=num_scales if m.router == "per_scale" else 1, backend=str(m.backend))
    return attach_mome(llm, num_scales, str(m.placement), layer_args, lb_topk_normalize=bool(m.lb_topk_normalize),
                       compute_z=float(m.z_coef) > 0, dtype=dtype)
