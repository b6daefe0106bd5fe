"""Names inside transformers that changed between the releases this project supports, in one place.

* The KV cache a causal LM takes and returns: ``past_key_values`` up to transformers 5.23, ``cache`` from 5.24
  (``past_key_values`` deprecated there, removal announced for 5.40), ``past_key_value`` inside 4.x layers.
* Turning on activation (gradient) checkpointing: ``activation_checkpointing_enable`` in recent 5.x releases,
  ``gradient_checkpointing_enable`` before (deprecated since, removal announced for v6).

Code that drives an LLM step by step with its own cache (the cost table, the benchmarks) asks these functions for
the names, so a release that renames them again is a fix here. ``tests/test_hf_compat.py`` exercises every name.
The adapters themselves (``mome.adapters.mome``, ``mome.adapters.lora``) read no transformers-internal names.
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def cache_kwarg(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes a KV cache by in the installed transformers."""
    params = inspect.signature(model.forward).parameters
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes no KV cache argument (looked for {', '.join(CACHE_KWARGS)})")


def output_cache(output: Any) -> Any:
    """The KV cache a forward with ``use_cache=True`` returned (None when it returned none)."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


def enable_checkpointing(model: nn.Module, checkpoint_kwargs: dict) -> None:
    """Turn on activation checkpointing of ``model``'s decoder layers with ``torch.utils.checkpoint`` kwargs."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
