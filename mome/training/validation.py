"""Validation during training: loss per scale on the validation split, a quick greedy WER per scale, and whether the
model reads its media (``mome.training.diagnostics``).

The loss is the utterance-weighted mean of the batch losses, batches sharded over processes (batch ``i`` goes to
process ``i % world``, run on the unwrapped module). Each batch's numbers are named sums (``batch_sums``, a
``mome.training.stats.Sums``), added up on each process and summed over processes with one all_reduce (``Sums.reduce``,
the helper the training micro-batches use). The WER decodes the first ``train.val_wer_samples`` validation
utterances greedily at every scale on the main process (scored with ``mome.metrics.wer``). Under ZeRO-3 every
process must run as many forwards (parameters are gathered collectively), so the shards are padded with weight-0
batches and the WER, which would need synchronised ``generate`` calls, is skipped.

Reading gap: every validation batch of two or more utterances also runs with its media rolled within the batch
(``roll_media``); ``ce_rolled`` is that CE per scale and ``reading_gap`` the mean of ``ce_rolled - ce`` over the same
batches (nats per token). On the main process, the first batch also gives the attention share on A/V tokens
(``attn_av_share``) and the token norms (``token_norm``).
"""
from __future__ import annotations

import math
import sys
from typing import Dict, Sequence

import torch

from mome.scales import Scale
from mome.training.stats import Sums


def to_device(batch: Dict, device) -> Dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def slice_batch(batch: Dict, n: int) -> Dict:
    """The first ``n`` utterances of a batch, with the padding trimmed to their longest item."""
    out = {k: v[:n] for k, v in batch.items()}
    if torch.is_tensor(out.get("audio")) and "audio_lengths" in out:
        out["audio"] = out["audio"][:, : int(out["audio_lengths"].max())]
    if torch.is_tensor(out.get("video")) and "video_lengths" in out:
        out["video"] = out["video"][:, : int(out["video_lengths"].max())]
    return out


def _shard(loader, world: int, rank: int, zero3: bool):
    """This process's batches with their weights (the utterance counts): batch ``i`` goes to process ``i % world``.
    Under ZeRO-3 a shorter shard is padded with batch 0 at weight 0, so that every process runs as many forwards."""
    n_batches = len(loader)
    mine = set(range(rank, n_batches, world))
    pad = math.ceil(n_batches / world) - len(mine) if zero3 else 0
    for i, batch in enumerate(loader):
        if batch is None:  # every sample bad (data.skip_bad)
            continue
        if i in mine:
            yield batch, float(len(batch["ids"]))
        elif pad and i == 0:
            pad -= 1
            yield batch, 0.0


def batch_sums(names: Sequence[str], out=None, rolled=None, weight: float = 0.0) -> Sums:
    """The weighted sums of one validation batch: loss, CE per scale and, when the batch also ran with its media
    rolled (``rolled``), the rolled CE and the reading gap per scale. Without outputs: the zeros every process starts
    from (the same keys, whatever its shard holds)."""
    s = Sums(names)
    s.add("loss", 0.0 if out is None else out.loss, weight)
    s.add_per_scale("ce", {} if out is None else out.ce, weight)
    rolled_ce = {} if rolled is None else rolled.ce
    s.add_per_scale("ce_rolled", rolled_ce, weight)
    s.add_per_scale("reading_gap", {n: float(ce) - float(out.ce[n]) for n, ce in rolled_ce.items()}, weight)
    return s


@torch.no_grad()
def validation_loss(accelerator, model, loader, scales: Sequence[Scale], zero3: bool = False) -> Dict:
    """Utterance-weighted loss, CE per scale, rolled-media CE and reading gap over all processes' shards (empty when
    no process had a batch)."""
    from mome.training.diagnostics import roll_media

    names, dev = [s.name for s in scales], accelerator.device
    sums = batch_sums(names)
    for batch, weight in _shard(loader, accelerator.num_processes, accelerator.process_index, zero3):
        out = model(to_device(batch, dev), scales=list(scales))
        rolled = model(to_device(roll_media(batch), dev), scales=list(scales)) if len(batch["ids"]) >= 2 else None
        sums += batch_sums(names, out, rolled, weight)
    sums = sums.reduce(accelerator)
    if float(sums.weight["loss"]) <= 0:
        return {}
    rec = {"loss": sums.mean("loss"), "ce": sums.per_scale("ce")}
    if sums.per_scale("ce_rolled"):
        rec["ce_rolled"] = sums.per_scale("ce_rolled")
        rec["reading_gap"] = sums.per_scale("reading_gap")
    return rec


@torch.no_grad()
def media_diagnostics(model, loader, scales: Sequence[Scale], device) -> Dict:
    """Attention share on A/V tokens and token norms on the first validation batch (``mome.training.diagnostics``)."""
    from mome.training.diagnostics import attention_av_share, token_norms

    for batch in loader:
        if batch is None:
            continue
        batch = to_device(batch, device)
        return {"attn_av_share": attention_av_share(model, batch, scales), "token_norm": token_norms(model, batch, scales)}
    return {}


@torch.no_grad()
def greedy_wer(model, loader, scales: Sequence[Scale], num_samples: int, max_new_tokens: int, device,
               strip_punctuation: bool = True) -> Dict:
    """Corpus WER per scale of greedy decoding on the first ``num_samples`` utterances of ``loader``."""
    from mome.metrics.wer import score_utterance

    errors = {s.name: 0 for s in scales}
    words = {s.name: 0 for s in scales}
    examples: Dict[str, str] = {}
    done = 0
    for batch in loader:
        if batch is None:
            continue
        take = min(len(batch["ids"]), num_samples - done)
        if take < len(batch["ids"]):
            batch = slice_batch(batch, take)
        batch = to_device(batch, device)
        for scale in scales:
            hyps = model.generate(batch, scale, num_beams=1, max_new_tokens=max_new_tokens)
            for uid, ref, hyp in zip(batch["ids"], batch["text"], hyps):
                sc = score_utterance(uid, ref, hyp, strip_punctuation=strip_punctuation)
                errors[scale.name] += sc.word_errors
                words[scale.name] += sc.ref_words
                examples.setdefault(scale.name, f"{ref} -> {hyp}")
        done += take
        if done >= num_samples:
            break
    return {"wer": {n: errors[n] / max(words[n], 1) for n in errors}, "wer_samples": done, "examples": examples}


def validate(accelerator, model, cfg, loader, scales: Sequence[Scale], zero3: bool = False) -> Dict:
    """Both, in eval mode; returns the record to log (empty when there is nothing to validate on)."""
    was_training = model.training
    model.eval()
    try:
        # Outside ZeRO-3 the forwards run on the unwrapped module: a DDP forward is a collective (buffer
        # broadcast) and the processes' shards may hold different numbers of batches.
        net = model if zero3 else accelerator.unwrap_model(model)
        rec = validation_loss(accelerator, net, loader, scales, zero3=zero3)
        n = int(cfg.train.val_wer_samples)
        if n > 0 and zero3:
            if accelerator.is_main_process:
                print("[train] note: validation WER is skipped under ZeRO-3", file=sys.stderr)
        elif n > 0 and accelerator.is_main_process:
            rec.update(greedy_wer(accelerator.unwrap_model(model), loader, scales, n, int(cfg.eval.max_new_tokens),
                                  accelerator.device, strip_punctuation=cfg.eval.strip_punctuation))
        if accelerator.is_main_process and not zero3:
            rec.update(media_diagnostics(accelerator.unwrap_model(model), loader, scales, accelerator.device))
        accelerator.wait_for_everyone()
    finally:
        model.train(was_training)
    return rec
