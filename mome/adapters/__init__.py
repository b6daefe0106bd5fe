"""Adapters inside a frozen Hugging Face LLM: where the trainable capacity enters the residual stream.

* ``mome``: MoME wrappers per placement (``MoMEAttention``, ``MoMEMLP``, ``MoMEDecoderLayer``) and ``attach_mome``;
* ``lora``: the LoRA baselines (PEFT global adapter; ``ScaleLoRALinear`` per-scale adapters);
* ``context``: the per-call context (scale ids, token mask, what the call collects) the adapters read;
* ``hf_compat``: the few transformers names that changed between supported releases.

This package is the one place that knows the structure of a Hugging Face decoder.
"""
from .context import AdapterCall, AdapterSet, CallSlot, RoutingRecord, RoutingTrace
from .lora import LoRAAdapters, ScaleLoRALinear, add_method_lora
from .mome import (PLACEMENTS, MoMEAdapters, MoMEAttention, MoMEDecoderLayer, MoMEMLP, attach_mome,
                   attach_mome_from_config, decoder_layers)

__all__ = ["AdapterCall", "AdapterSet", "CallSlot", "LoRAAdapters", "MoMEAdapters", "MoMEAttention",
           "MoMEDecoderLayer", "MoMEMLP", "PLACEMENTS", "RoutingRecord", "RoutingTrace", "ScaleLoRALinear",
           "add_method_lora", "attach_mome", "attach_mome_from_config", "decoder_layers"]
