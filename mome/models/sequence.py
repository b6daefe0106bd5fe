"""Assembly of the LLM input sequences (docs/method.md#prompt, docs/decisions.md#prompt-markers).

One row per (scale, sample):

    [BOS] <audio> A_1..A_na </audio> <video> V_1..V_nv </video> instruction transcript EOS

ASR rows drop the video block, VSR rows the audio block; BOS is dropped when the tokenizer has none (Qwen). The four
markers are trainable vectors owned by our model (``BoundaryEmbeddings``); the tokenizer and the LLM's vocabulary stay
exactly as loaded. Text is embedded with the frozen LLM input embeddings.

Padding. Each row holds only its own tokens, contiguously: a clip's A/V padding never enters the sequence (its pooled
length decides how many tokens it contributes) and the row is padded at the end (training, right padding) or the
start (generation, left padding) with an attention mask of 0 there. Positions are therefore identical whatever the
row is batched with, which makes a sample's loss independent of its batch mates.

Labels are the token ids on transcript + EOS positions and -100 elsewhere (position-aligned: the logits at position
t-1 predict ``labels[t]``). ``roles`` gives every position's ``TokenRole`` for analysis; ``scale_ids`` every row's
scale id (index into ``mome.scales.all_scales``).

Many scales go through the LLM in ONE call: rows are scale-major (row = k * B + b for the k-th scale in the call).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from mome.scales import Scale

IGNORE = -100


class TokenRole(IntEnum):
    """Codes match ``analysis.trace.ROLES`` (audio, video, boundary, instruction, transcript, pad)."""

    AUDIO = 0
    VIDEO = 1
    BOUNDARY = 2  # BOS and the four modality markers
    INSTRUCTION = 3
    TRANSCRIPT = 4  # transcript tokens and EOS (the loss positions)
    PAD = 5


BOUNDARY_MARKERS = ("<audio>", "</audio>", "<video>", "</video>")


class BoundaryEmbeddings(nn.Module):
    """The four trainable modality markers, ``weight[i]`` for ``BOUNDARY_MARKERS[i]``."""

    def __init__(self, dim: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(len(BOUNDARY_MARKERS), dim) * std)

    def forward(self, marker: str) -> torch.Tensor:
        return self.weight[BOUNDARY_MARKERS.index(marker)][None]


@dataclass
class ScaleTokens:
    """The projected A/V tokens of one scale for the whole batch (None for a modality the task does not use)."""

    scale: Scale
    scale_id: int
    audio: Optional[torch.Tensor] = None  # [B, Na, d]
    audio_lengths: Optional[torch.Tensor] = None  # [B]
    video: Optional[torch.Tensor] = None
    video_lengths: Optional[torch.Tensor] = None


@dataclass
class LLMInputs:
    inputs_embeds: torch.Tensor  # [R, S, d]
    attention_mask: torch.Tensor  # [R, S] long, 1 on real tokens
    roles: torch.Tensor  # [R, S] int8 TokenRole
    scale_ids: torch.Tensor  # [R] long
    labels: Optional[torch.Tensor] = None  # [R, S] long, IGNORE outside transcript + EOS (None for prompts)

    @property
    def token_mask(self) -> torch.Tensor:
        return self.attention_mask.bool()


class SequenceBuilder(nn.Module):
    """Turns projected A/V tokens and transcripts into LLM rows. Owns the boundary embeddings."""

    def __init__(self, tokenizer, embed_tokens: nn.Embedding, prompts: Mapping[str, str], dim: int):
        """``prompts``: the instruction text of each task (``{"asr": ..., "vsr": ..., "avsr": ...}``)."""
        super().__init__()
        self.tokenizer = tokenizer
        self.embed_tokens = [embed_tokens]  # a list: the frozen LLM table is not a submodule of ours
        self.boundary = BoundaryEmbeddings(dim)
        self.prompts = dict(prompts)
        self.bos_id = self.eos_id = None
        self.instruction_ids = {}
        if tokenizer is not None:
            self.bos_id = tokenizer.bos_token_id
            self.eos_id = tokenizer.eos_token_id
            if self.eos_id is None:
                raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token; transcripts need one")
            self.instruction_ids = {task: self.encode(text) for task, text in self.prompts.items()}

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _embed(self, ids: Sequence[int], device) -> torch.Tensor:
        return self.embed_tokens[0](torch.tensor(list(ids), dtype=torch.long, device=device))

    def build(
        self,
        parts: Sequence[ScaleTokens],
        transcripts: Optional[Sequence[str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> LLMInputs:
        """Rows for every scale in ``parts`` and every sample. With ``transcripts``: training rows (labels, right
        padding); without: generation prompts (left padding)."""
        if self.tokenizer is None:
            raise RuntimeError("this model was built without a tokenizer (meta device); it cannot build sequences")
        ref = next(t for p in parts for t in (p.audio, p.video) if t is not None)
        device, dtype = ref.device, dtype or ref.dtype
        batch = ref.shape[0]
        bos = self._embed([self.bos_id], device) if self.bos_id is not None else None
        instr = {p.scale.task: self._embed(self.instruction_ids[p.scale.task], device) for p in parts}
        targets = None
        if transcripts is not None:
            if len(transcripts) != batch:
                raise ValueError(f"{len(transcripts)} transcripts for a batch of {batch} clips")
            targets = [self.encode(t) + [self.eos_id] for t in transcripts]
            target_embeds = [self._embed(t, device) for t in targets]

        rows, roles, labels, scale_ids = [], [], [], []
        for p in parts:
            for b in range(batch):
                segs = []  # (embeddings [n, d], role, label ids or None)
                if bos is not None:
                    segs.append((bos, TokenRole.BOUNDARY, None))
                if p.audio is not None:
                    segs += [
                        (self.boundary("<audio>"), TokenRole.BOUNDARY, None),
                        (p.audio[b, : int(p.audio_lengths[b])], TokenRole.AUDIO, None),
                        (self.boundary("</audio>"), TokenRole.BOUNDARY, None),
                    ]
                if p.video is not None:
                    segs += [
                        (self.boundary("<video>"), TokenRole.BOUNDARY, None),
                        (p.video[b, : int(p.video_lengths[b])], TokenRole.VIDEO, None),
                        (self.boundary("</video>"), TokenRole.BOUNDARY, None),
                    ]
                segs.append((instr[p.scale.task], TokenRole.INSTRUCTION, None))
                if targets is not None:
                    segs.append((target_embeds[b], TokenRole.TRANSCRIPT, targets[b]))
                rows.append(torch.cat([s[0].to(dtype) for s in segs]))
                roles.append(torch.cat([torch.full((len(s[0]),), int(s[1]), dtype=torch.int8) for s in segs]))
                labels.append(
                    torch.cat(
                        [
                            torch.tensor(s[2]) if s[2] is not None else torch.full((len(s[0]),), IGNORE)
                            for s in segs
                        ]
                    )
                )
                scale_ids.append(p.scale_id)

        side = "right" if targets is not None else "left"
        lengths = torch.tensor([len(r) for r in rows])
        embeds = pad_sequence(rows, batch_first=True, padding_side=side)
        mask = pad_sequence([torch.ones(n, dtype=torch.long) for n in lengths.tolist()], True, 0, side)
        out = LLMInputs(
            inputs_embeds=embeds,
            attention_mask=mask.to(device),
            roles=pad_sequence(roles, True, int(TokenRole.PAD), side).to(device),
            scale_ids=torch.tensor(scale_ids, dtype=torch.long, device=device),
        )
        if targets is not None:
            out.labels = pad_sequence(labels, True, IGNORE, side).to(device)
        return out


@dataclass
class PackedInputs:
    """Rows of one scale packed end to end (``pack_rows``): the LLM sees fewer, fuller rows."""

    inputs_embeds: torch.Tensor  # [P, L, d]
    position_ids: torch.Tensor  # [P, L] long, restarting at 0 in every segment
    token_mask: torch.Tensor  # [P, L] bool, False on the tail padding
    labels: torch.Tensor  # [P, L] long, IGNORE outside transcript + EOS
    origin: torch.Tensor  # [P, L] long, the padded row each position came from (-1 on the tail padding)
    scale_ids: torch.Tensor  # [P] long


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Indices of ``lengths`` grouped into bins of total length <= ``capacity`` (longest first, each into the first
    bin it fits; an item longer than ``capacity`` gets a bin of its own)."""
    bins: List[List[int]] = []
    load: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b in range(len(bins)):
            if load[b] + lengths[i] <= capacity:
                bins[b].append(i)
                load[b] += lengths[i]
                break
        else:
            bins.append([i])
            load.append(lengths[i])
    return bins


def pack_rows(inputs: LLMInputs, capacity_factor: float = 2.0) -> PackedInputs:
    """Pack the right-padded training rows of ``inputs``: rows of the same scale id are concatenated into packed rows
    of at most ``capacity_factor`` x the longest row's tokens (first fit decreasing), positions restart at 0 in
    every segment, and the packed rows are right-padded to the fullest one (the padding continues the last
    segment's positions, so with ``attention_mask=None`` the LLM's mask, built from the positions, is causal within
    each segment: ``transformers.masking_utils.find_packed_sequence_indices``). Every token sees exactly the tokens
    it saw in its own row, so the loss equals the padded call's (up to floating-point summation order)."""
    if inputs.labels is None:
        raise ValueError("pack_rows packs training rows (with labels); generation prompts are left-padded")
    lengths = inputs.attention_mask.sum(1).tolist()
    capacity = int(max(lengths) * capacity_factor)
    groups: dict = {}
    for r, sid in enumerate(inputs.scale_ids.tolist()):
        groups.setdefault(sid, []).append(r)
    packs, pack_scale = [], []
    for sid, rows in groups.items():
        for b in first_fit_decreasing([lengths[r] for r in rows], capacity):
            packs.append([rows[i] for i in b])
            pack_scale.append(sid)
    embeds, pos, labels, origin = [], [], [], []
    for rows in packs:
        embeds.append(torch.cat([inputs.inputs_embeds[r, : lengths[r]] for r in rows]))
        pos.append(torch.cat([torch.arange(lengths[r]) for r in rows]))
        labels.append(torch.cat([inputs.labels[r, : lengths[r]] for r in rows]))
        origin.append(torch.cat([torch.full((lengths[r],), r, dtype=torch.long) for r in rows]))
    width = max(len(p) for p in pos)
    device = inputs.inputs_embeds.device
    for i in range(len(packs)):
        pad = width - len(pos[i])
        if pad:
            pos[i] = torch.cat([pos[i], pos[i][-1] + 1 + torch.arange(pad)])
    real = [torch.ones(len(o), dtype=torch.bool) for o in origin]
    return PackedInputs(
        inputs_embeds=pad_sequence(embeds, batch_first=True),
        position_ids=torch.stack(pos).to(device),
        token_mask=pad_sequence(real, batch_first=True).to(device),
        labels=pad_sequence(labels, batch_first=True, padding_value=IGNORE).to(device),
        origin=pad_sequence(origin, batch_first=True, padding_value=-1).to(device),
        scale_ids=torch.tensor(pack_scale, dtype=torch.long, device=device),
    )
