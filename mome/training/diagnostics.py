"""Is the model reading its audio-visual tokens? Measurements logged at validation and at log steps.

* **Reading gap** (``roll_media``): the CE of each utterance's transcript with its own A/V tokens against the CE with
  another utterance's A/V tokens (the media rolled by one place within the batch, the transcripts kept). A model that
  only learned the grammar of the transcripts shows no gap; one that reads shows a gap of nats per token.
* **Attention share** (``attention_av_share``): the share of attention that the positions predicting transcript
  tokens put on A/V tokens, averaged over heads and layers, from one validation batch run with eager attention (the
  only implementation that returns the attention probabilities).
* **Token norms** (``token_norms``): mean L2 norm of the audio tokens, video tokens and text (transcript) embeddings
  entering the LLM: projector outputs far larger or smaller than text stall learning
  (``model.projector.match_embedding_rms``).
* **Gradient norms per parameter group** (``grad_group_norms``): projectors, boundary markers, MoME experts/routers,
  video front end; before clipping.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, Sequence

import torch
from torch import nn

from mome.adapters import decoder_layers
from mome.models.sequence import TokenRole
from mome.scales import Scale

MEDIA_KEYS = ("audio", "audio_lengths", "video", "video_lengths")
# parameter-name prefix (of AVSRModel.named_parameters) -> group name
PARAM_GROUPS = (
    ("audio_projectors.", "audio_projectors"),
    ("video_projectors.", "video_projectors"),
    ("sequences.boundary.", "boundary"),
    ("video_encoder.", "video_frontend"),
    ("audio_encoder.", "audio_encoder"),
    ("mome.", "mome"),
)


def roll_media(batch: Dict, shift: int = 1) -> Dict:
    """The batch with every utterance's audio and video replaced by those of the utterance ``shift`` places on
    (lengths rolled with them); transcripts and ids unchanged."""
    out = dict(batch)
    for key in MEDIA_KEYS:
        if torch.is_tensor(batch.get(key)):
            out[key] = torch.roll(batch[key], shifts=shift, dims=0)
    return out


def param_group(name: str) -> str:
    for prefix, group in PARAM_GROUPS:
        if name.startswith(prefix):
            return group
    return "other"


def grad_group_norms(model: nn.Module) -> Dict[str, float]:
    """L2 norm of the gradients of each parameter group (``PARAM_GROUPS``); groups without gradients left out."""
    sq: Dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = param_group(name)
            sq[g] = sq.get(g, 0.0) + float(p.grad.detach().float().pow(2).sum())
    return {g: math.sqrt(v) for g, v in sq.items()}


@torch.no_grad()
def token_norms(model, batch: Dict, scales: Sequence[Scale]) -> Dict[str, float]:
    """Mean L2 norm of the audio, video and transcript-embedding tokens of the LLM rows of ``scales``."""
    inputs = model.build_inputs(batch, list(scales), with_transcripts=True)
    norms = inputs.inputs_embeds.float().norm(dim=-1)
    out = {}
    for role, name in ((TokenRole.AUDIO, "audio"), (TokenRole.VIDEO, "video"), (TokenRole.TRANSCRIPT, "text")):
        sel = inputs.roles == int(role)
        if bool(sel.any()):
            out[name] = float(norms[sel].mean())
    return out


@contextlib.contextmanager
def eager_attention(llm: nn.Module) -> Iterator[None]:
    """Inside the block the LLM runs eager attention (which returns attention probabilities)."""
    previous = llm.config._attn_implementation
    if previous == "eager":
        yield
        return
    llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        llm.set_attn_implementation(previous)


@torch.no_grad()
def attention_av_share(model, batch: Dict, scales: Sequence[Scale]) -> Dict[str, float]:
    """Per scale: the mean share of attention (over heads, layers and the positions that predict transcript tokens)
    that lands on audio or video tokens."""
    scales = list(scales)
    inputs = model.build_inputs(batch, scales, with_transcripts=True)
    roles = inputs.roles
    # position t-1 predicts labels[t]: queries are the positions whose next token is a transcript token
    query = torch.zeros_like(roles, dtype=torch.bool)
    query[:, :-1] = roles[:, 1:] == int(TokenRole.TRANSCRIPT)
    media = (roles == int(TokenRole.AUDIO)) | (roles == int(TokenRole.VIDEO))
    per_row = []  # [layers] of [R] mean share per row

    def hook(module, args, output):
        probs = output[1]  # [R, H, S, S]
        share = (probs.float() * media[:, None, None, :]).sum(-1).mean(1)  # [R, S]
        per_row.append((share * query).sum(1) / query.sum(1).clamp_min(1))

    llm = model.llm
    handles = [layer.self_attn.register_forward_hook(hook) for layer in decoder_layers(llm)]
    try:
        with eager_attention(llm), model.adapter_call(inputs):
            llm.get_decoder()(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                              use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not per_row:
        return {}
    share = torch.stack(per_row).mean(0)  # [R]
    b = share.shape[0] // len(scales)
    return {s.name: float(share[k * b:(k + 1) * b].mean()) for k, s in enumerate(scales)}
