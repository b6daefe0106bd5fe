"""Batched decoding of a split at one SNR, every requested scale per batch, and per-utterance hypothesis files.

Each batch from ``mome.data.build_dataloader`` (padded audio/video with their lengths) is decoded once per scale with
``model.generate`` (beam search over the padding-masked prompt), so audio loading and noise mixing happen once per
SNR. Decoding is deterministic by default (``do_sample=False``); the torch seed is reset before each pass so a
sampling run is repeatable too.

Hypothesis files are JSONL, one object per utterance: ``id``, ``ref``, ``hyp``, the normalised texts, the error
counts and the per-utterance WER (``mome.metrics.wer.UtteranceScore``), plus ``method``, ``scale`` and ``snr``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..scales import Scale
from ..metrics.wer import CorpusScore, score_corpus

# (id, reference, hypothesis)
Triple = Tuple[str, str, str]


def _len(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


@torch.inference_mode()
def decode_loader(
    model,
    loader: Iterable[Dict],
    scales: Sequence[Scale],
    num_beams: int = 5,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    seed: int = 0,
    progress: bool = True,
    desc: str = "decode",
) -> Dict[str, List[Triple]]:
    """Hypotheses per scale name, in loader order: ``{scale.name: [(id, ref, hyp), ...]}``."""
    model.eval()
    torch.manual_seed(seed)
    out: Dict[str, List[Triple]] = {s.name: [] for s in scales}
    bar = tqdm(loader, total=_len(loader), desc=desc, unit="batch", disable=not progress, leave=False)
    for batch in bar:
        ids, refs = list(batch["ids"]), list(batch["text"])
        for scale in scales:
            bar.set_postfix_str(scale.name)
            hyps = model.generate(batch, scale, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=do_sample)
            if len(hyps) != len(ids):
                raise RuntimeError(f"model.generate returned {len(hyps)} hypotheses for a batch of {len(ids)} at {scale}")
            out[scale.name].extend(zip(ids, refs, hyps))
    bar.close()
    return out


def transcribe_loader(
    transcribe: Callable[[List], List[str]],
    loader: Iterable[Dict],
    progress: bool = True,
    desc: str = "judge",
) -> List[Triple]:
    """Run ``transcribe(list of 1-D float arrays at 16 kHz)`` over a loader's un-padded audio (the judge's path)."""
    out: List[Triple] = []
    bar = tqdm(loader, total=_len(loader), desc=desc, unit="batch", disable=not progress, leave=False)
    for batch in bar:
        audio, lengths = batch["audio"], batch["audio_lengths"]
        waves = [audio[i, : int(lengths[i])].float().cpu().numpy() for i in range(audio.shape[0])]
        hyps = transcribe(waves)
        if len(hyps) != len(waves):
            raise RuntimeError(f"transcriber returned {len(hyps)} texts for {len(waves)} utterances")
        out.extend(zip(batch["ids"], batch["text"], hyps))
    bar.close()
    return out


def score_and_write(
    triples: Sequence[Triple],
    path: str | os.PathLike,
    strip_punctuation: bool = True,
    extra: Optional[Dict] = None,
    hyp_transform: Optional[Callable[[str], str]] = None,
) -> CorpusScore:
    """Score (id, ref, hyp) triples and write one JSONL line per utterance to ``path``; returns the corpus totals.

    ``hyp_transform`` (e.g. ``spell_numbers`` for the judge) rewrites each hypothesis before scoring; the line then
    keeps the recogniser's own text as ``hyp_raw``.
    """
    if not triples:
        raise ValueError(f"no utterances to score for {path}: the split is empty after filtering")
    ids, refs, raw = zip(*triples)
    hyps = [hyp_transform(h) for h in raw] if hyp_transform else raw
    corpus, utts = score_corpus(refs, hyps, ids=ids, strip_punctuation=strip_punctuation)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with tmp.open("w") as f:
        for u, r in zip(utts, raw):
            line = {**(extra or {}), **u.to_dict()}
            if hyp_transform:
                line["hyp_raw"] = r
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, p)
    return corpus
