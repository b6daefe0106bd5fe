"""The per-call context of the adapters inside a frozen LLM: which scale each row is, which tokens are real, and
what the call collects.

An LLM call (a training forward, or one ``generate``) is made inside ``slot.bind(AdapterCall(...))``. The adapter
modules in the decoder layers (MoME wrappers, scale-specific LoRA) read ``slot.current`` while that call runs; no
adapter keeps a "current scale" of its own, and nothing travels through the LLM's forward kwargs.

Gradient checkpointing recomputes a layer's forward during backward, after ``bind`` has returned (and possibly
after later forwards bound other calls). ``CallSlot.checkpoint_kwargs()`` gives ``torch.utils.checkpoint`` a
``context_fn`` that captures the bound call when the checkpointed forward runs and re-binds it, marked
``recomputing``, while that forward is recomputed: the recomputation sees the same scale ids, and records nothing
twice. Enable checkpointing on an LLM with adapters only through those kwargs
(``mome.adapters.hf_compat.enable_checkpointing(llm, adapters.checkpoint_kwargs())``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional

import torch
from torch import Tensor


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
class AdapterCall:
    """What the adapters need to know about one LLM call, and what they collect during it.

    ``scale_ids`` LongTensor [B] (the scale of each row; ``generate`` may expand rows for beams: row ``b`` becomes
    rows ``b*k .. b*k+k-1``, as transformers does). ``token_mask`` BoolTensor [B, P], False on padding: only needed
    for training losses and routing traces, over the first call of each layer (the whole sequence, or the prompt of
    ``generate``; tokens generated after it are real). ``collect_aux``: record load-balancing statistics (training).
    ``trace``: record every layer's routing.
    """

    scale_ids: Tensor
    token_mask: Optional[Tensor] = None
    collect_aux: bool = False
    trace: Optional[RoutingTrace] = None
    aux: list = field(default_factory=list)  # filled by the adapters (see mome.adapters.mome)
    recomputing: bool = False  # a gradient-checkpoint recomputation of a forward already recorded
    _seen: set = field(default_factory=set, repr=False)  # layers that have had their first call

    def __post_init__(self):
        if not isinstance(self.scale_ids, Tensor) or self.scale_ids.dim() != 1:
            raise ValueError(f"scale_ids must be a LongTensor [batch], got {getattr(self.scale_ids, 'shape', self.scale_ids)}")
        m = self.token_mask
        if m is not None and (not isinstance(m, Tensor) or m.dim() != 2 or m.shape[0] != self.scale_ids.shape[0]):
            raise ValueError(f"token_mask must be a BoolTensor [batch={self.scale_ids.shape[0]}, seq], got "
                             f"{getattr(m, 'shape', type(m))}")

    @property
    def records(self) -> bool:
        """Whether this pass records statistics and traces (not during a checkpoint recomputation)."""
        return not self.recomputing

    def rows(self, hidden: Tensor, where: str) -> Tensor:
        """Scale id of every row of ``hidden`` [B', S, d] (B' = B, or B * beams)."""
        ids, n = self.scale_ids, hidden.shape[0]
        if n != ids.shape[0]:
            if ids.shape[0] == 0 or n % ids.shape[0]:
                raise ValueError(f"{where}: the call's scale_ids have {ids.shape[0]} rows but the input has {n}")
            ids = ids.repeat_interleave(n // ids.shape[0])
        return ids.to(hidden.device)

    def mask(self, layer: int, hidden: Tensor, where: str) -> Optional[Tensor]:
        """The token mask over this call's tokens in ``layer`` (None: all real)."""
        first = layer not in self._seen
        if not self.recomputing:
            self._seen.add(layer)
        m = self.token_mask
        if m is None or not (first or self.recomputing):
            return None  # generated tokens are real
        n, S = hidden.shape[:2]
        if m.shape[1] != S:
            raise ValueError(f"{where}: token_mask has {m.shape[1]} positions but the first call sees {S} tokens")
        if n != m.shape[0]:
            m = m.repeat_interleave(n // m.shape[0], dim=0)
        return m.to(device=hidden.device, dtype=torch.bool)


class CallSlot:
    """Holds the ``AdapterCall`` of the LLM call in progress, for the adapter modules of one LLM."""

    def __init__(self, num_scales: int):
        self.num_scales = num_scales
        self.current: Optional[AdapterCall] = None

    @contextlib.contextmanager
    def bind(self, call: AdapterCall) -> Iterator[AdapterCall]:
        ids = call.scale_ids
        if ids.device.type == "cpu" and ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.num_scales):
            raise ValueError(f"scale_ids {ids.tolist()} out of range for {self.num_scales} scales")
        previous, self.current = self.current, call
        try:
            yield call
        finally:
            self.current = previous

    def get(self, where: str) -> AdapterCall:
        if self.current is None:
            raise RuntimeError(f"{where}: the LLM was called outside an adapter call; wrap the call in "
                               "`with adapters.call(scale_ids): ...` (see mome.adapters)")
        return self.current

    def checkpoint_kwargs(self) -> dict:
        """``torch.utils.checkpoint`` kwargs for ``hf_compat.enable_checkpointing(llm, ...)``."""
        return {"use_reentrant": False, "context_fn": self._checkpoint_contexts}

    def _checkpoint_contexts(self):
        captured = self.current  # the call bound while the checkpointed forward runs

        @contextlib.contextmanager
        def recompute():
            if captured is None:
                yield
                return
            previous, self.current = self.current, replace(captured, recomputing=True, aux=[], _seen=set())
            try:
                yield
            finally:
                self.current = previous

        return contextlib.nullcontext(), recompute()


class AdapterSet:
    """Base of the adapters attached to one LLM (MoME, scale-specific LoRA): the slot their modules read, and
    ``call`` to bind one LLM call's context around a forward or ``generate``."""

    num_layers = 0  # layers whose routing a trace records (MoME); 0: nothing routes

    def __init__(self, num_scales: int):
        self.num_scales = num_scales
        self.slot = CallSlot(num_scales)

    def checkpoint_kwargs(self) -> dict:
        return self.slot.checkpoint_kwargs()

    @contextlib.contextmanager
    def call(self, scale_ids: Optional[Tensor] = None, token_mask: Optional[Tensor] = None, trace: bool = False,
             batch_size: Optional[int] = None) -> Iterator[AdapterCall]:
        """Bind one LLM call's scale ids (default: all 0, ``batch_size`` rows), token mask and routing trace."""
        if scale_ids is None:
            if batch_size is None:
                raise ValueError(f"{type(self).__name__}.call: give scale_ids or batch_size")
            scale_ids = torch.zeros(batch_size, dtype=torch.long)
        if trace and not self.num_layers:
            raise RuntimeError(f"{type(self).__name__} has no router: there is no routing to trace")
        call = AdapterCall(scale_ids=scale_ids, token_mask=token_mask,
                           trace=RoutingTrace(layers=[[] for _ in range(self.num_layers)]) if trace else None)
        with self.slot.bind(call):
            yield call
