"""What the analysis takes from a model's forward pass besides the routing (``model.record_routing()``).

* ``HiddenStates``: forward hooks on the LLM's decoder layers that keep chosen layers' hidden states for one call;
  "layer -1" is the input of the first decoder layer, i.e. the ``inputs_embeds`` whose audio and video positions are
  the projector outputs.
* ``similarity_matrices``: for one utterance, cosine similarity between its audio (or video) tokens at two rates.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from analysis import stats as S
from analysis.trace import ROLE_CODE
from mome.scales import Scale

PAD = ROLE_CODE["pad"]


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    base = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, "model", llm)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(llm).__name__} has no decoder layers at .model.layers")
    return layers


class HiddenStates:
    """``with HiddenStates(llm, [-1, 5]) as hs: llm(...)`` then ``hs.states[-1]``: [R, S, d] (last call wins).

    Layer ``-1`` is the input of decoder layer 0 (the embeddings); layer ``l >= 0`` is the output of decoder layer l.
    """

    def __init__(self, llm: nn.Module, layers: Sequence[int]):
        self.layers = decoder_layers(llm)
        self.wanted = sorted(set(int(x) for x in layers))
        for x in self.wanted:
            if not -1 <= x < len(self.layers):
                raise ValueError(f"hidden-state layer {x} out of range: the LLM has {len(self.layers)} layers (-1 = input)")
        self.states: Dict[int, torch.Tensor] = {}
        self._hooks: list = []

    def __enter__(self) -> "HiddenStates":
        for x in self.wanted:
            if x == -1:
                self._hooks.append(self.layers[0].register_forward_pre_hook(self._pre, with_kwargs=True))
            else:
                self._hooks.append(self.layers[x].register_forward_hook(self._post(x)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _pre(self, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        self.states[-1] = h.detach().float().cpu()

    def _post(self, i: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            self.states[i] = h.detach().float().cpu()

        return hook


def similarity_matrices(
    rows: Dict[Scale, Tuple[np.ndarray, np.ndarray]], source: str, utterance_id: str
) -> List[dict]:
    """Cosine-similarity matrices between the tokens of one utterance at two rates of the same modality.

    ``rows``: ``{scale: (roles [S], features [S, d])}`` for that utterance (padding already removed). For every
    modality and every pair of distinct rates, the first scale (in ``rows`` order) having each rate is used. Rows of
    a matrix are the coarser rate's tokens, columns the finer rate's.
    """
    out = []
    for modality in ("audio", "video"):
        by_rate: Dict[int, np.ndarray] = {}
        for scale, (roles, feats) in rows.items():
            rate = scale.audio_rate if modality == "audio" else scale.video_rate
            if rate is not None and rate not in by_rate:
                by_rate[rate] = feats[roles == ROLE_CODE[modality]]
        rates = sorted(by_rate)
        for i, fine in enumerate(rates):
            for coarse in rates[i + 1:]:
                a, b = by_rate[coarse], by_rate[fine]
                if len(a) == 0 or len(b) == 0:
                    continue
                sim = S.cosine_similarity(a, b)
                out.append({
                    "utterance": utterance_id,
                    "modality": modality,
                    "source": source,
                    "coarse_rate": coarse,
                    "fine_rate": fine,
                    "sim": sim.astype(np.float32),
                    "summary": S.similarity_summary(sim, coarse, fine),
                })
    return out


@contextlib.contextmanager
def no_grad_eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)
