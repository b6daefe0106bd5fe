"""The one place that knows names inside transformers and torch which change between releases.

MoME attaches to a stock Hugging Face decoder; a few of the things it needs have no public, stable name:

* the KV cache handed to decoder layers and attention: ``past_key_values`` up to transformers 5.23, ``cache`` from
  5.24 (``past_key_values`` deprecated there, removal announced for 5.40), ``past_key_value`` in 4.x;
* the cache on a model output (``out.past_key_values`` / ``out.cache``), and the keyword a caller passes it back by;
* ``generate()``'s kwargs check (``_validate_model_kwargs``), which rejects the per-row scale ids that travel to
  our modules in the decoder's ``**kwargs``;
* whether autograd is running a backward pass (a gradient-checkpoint recomputation), which only
  ``torch._C._current_graph_task_id`` tells (``torch.utils.checkpoint`` reads it too).

Everything else in the project goes through these functions, so a release that renames one of them is a fix here.
``tests/test_hf_compat.py`` exercises every name.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable, Optional

import torch
from torch import nn

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def cached_length(kwargs: dict, layer_idx: int) -> Optional[int]:
    """Tokens already in the KV cache of layer ``layer_idx``, from a decoder layer's (or attention's) kwargs;
    None when the call carries no cache."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length(layer_idx))
    return None


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


def allow_generate_kwargs(llm: nn.Module, names: Iterable[str]) -> None:
    """Let ``llm.generate(...)`` pass ``names`` on to ``forward`` (they travel in the decoder's ``**kwargs``).

    ``generate()`` rejects kwargs its model's forward signature does not name. This wraps the check on this model
    instance only (the class is untouched) so that it ignores ``names``; calling it again adds names.
    ``disallow_generate_kwargs`` undoes it.
    """
    allowed = llm.__dict__.setdefault("_mome_generate_kwargs", set())
    allowed.update(names)
    validate = getattr(type(llm), "_validate_model_kwargs", None)
    if validate is None or "_validate_model_kwargs" in llm.__dict__:
        return  # no such check in this release, or already wrapped

    def _validate_model_kwargs(model_kwargs):
        return validate(llm, {k: v for k, v in model_kwargs.items() if k not in allowed})

    llm._validate_model_kwargs = _validate_model_kwargs


def disallow_generate_kwargs(llm: nn.Module, names: Iterable[str]) -> None:
    allowed = llm.__dict__.get("_mome_generate_kwargs", set())
    allowed.difference_update(names)
    if not allowed:
        llm.__dict__.pop("_mome_generate_kwargs", None)
        llm.__dict__.pop("_validate_model_kwargs", None)


def in_backward() -> bool:
    """True while autograd runs a backward pass (so a gradient-checkpointed forward is being recomputed)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    if task_id is None:
        raise RuntimeError("this torch has no torch._C._current_graph_task_id; mome.models.hf_compat.in_backward "
                           "needs another way to detect a checkpoint recomputation")
    return task_id() != -1  # -1 outside backward
