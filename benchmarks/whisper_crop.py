"""Whisper encoder on short clips (cropped positions) vs the stock 30 s padded encoder: speed, features, judge WER.

Clips: the synthetic corpus' test split (``python -m mome.data.synth``; generated into the cache when missing),
raw waveforms (no waveform layer-norm, as the judge gets them), batch 1.

* **Speed**: ``mome.models.encoders.WhisperAudioEncoder`` with ``pad_to_30s=False`` (log-mel of the clip only,
  positional table cropped, padded frames masked) vs ``pad_to_30s=True`` (the stock encoder on 3000 mel frames),
  interleaved per clip, medians over rounds.
* **Features**: how far the cropped encoder's frames are from the 30 s encoder's frames of the same clip (cosine
  similarity, relative L2 error).
* **Judge WER** (is the crop free?): the judge's own Whisper decoder (``mome.evaluation.judge.WhisperJudge``, beam
  search) transcribes from four encoder outputs:
  ``30s``: the stock 1500 frames (what the judge itself does); ``crop+tail``: the clip's frames from the cropped
  encoder followed by the 30 s encoder's frames for the rest of the window (isolates the crop: only the clip's
  frames differ from ``30s``); ``crop``: the cropped frames alone; ``30s-cut``: the 30 s encoder's clip frames
  alone (what ``pad_to_30s=True`` hands to our model). Whisper's decoder was trained on 1500 frames, so the two
  short variants show its behaviour on a short window rather than the quality of the features; ``crop+tail`` vs
  ``30s`` answers the question. WER is scored with ``mome.metrics.wer``.
"""
from __future__ import annotations

import logging
import statistics
from typing import Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.common import time_interleaved

VARIANTS = ("30s", "crop+tail", "crop", "30s-cut")


def data_config(synth_num: int, data_root: Optional[str] = None, overrides: Sequence[str] = ()):
    from mome.config import load_config

    ov = [f"data.synth.num={synth_num}", "data.synth.seed=0", "data.transforms.normalize_waveform=false",
          "data.max_batch_size=1", "data.num_workers=0", "logging.progress=false"]
    if data_root:
        ov.append(f"data.root={data_root}")
    return load_config(None, ov + list(overrides))


def load_clips(cfg, max_utterances: int) -> List[Dict]:
    """Test-split clips: ``{"id", "text", "audio" [1, N], "audio_lengths" [1]}`` (corpus generated if missing)."""
    from mome.data import build_dataloader
    from mome.data.synth import ensure_corpus

    ensure_corpus(cfg)
    clips = []
    for b in build_dataloader(cfg, "test", train=False, max_utterances=max_utterances):
        for i in range(len(b["ids"])):
            n = int(b["audio_lengths"][i])
            clips.append({"id": b["ids"][i], "text": b["text"][i], "audio": b["audio"][i:i + 1, :n].clone(),
                          "audio_lengths": torch.tensor([n])})
    if not clips:
        raise RuntimeError(f"no test utterances in the corpus of data.synth.num={cfg.data.synth.num}")
    return clips


def load_encoders(judge):
    from mome.models.encoders import WhisperAudioEncoder

    enc = judge.model.get_encoder()
    return WhisperAudioEncoder(enc, pad_to_30s=False).to(judge.model.device), \
        WhisperAudioEncoder(enc, pad_to_30s=True).to(judge.model.device)


def run(synth_num: int, max_utterances: int, repeats: int, speed_clips: int = 4, num_beams: int = 5,
        max_new_tokens: int = 40, judge_model: str = "whisper-tiny.en", data_root: Optional[str] = None,
        short_variant_utterances: Optional[int] = None, data_overrides: Sequence[str] = (),
        verbose: bool = True) -> Dict:
    """``short_variant_utterances``: decode the ``crop`` and ``30s-cut`` variants (slow: without the 30 s context
    the decoder often loops up to ``max_new_tokens``) on the first N clips only (None = all)."""
    from transformers.modeling_outputs import BaseModelOutput

    from mome.config import cache_dir
    from mome.evaluation.judge import WhisperJudge
    from mome.metrics.wer import score_corpus

    cfg = data_config(synth_num, data_root, data_overrides)
    clips = load_clips(cfg, max_utterances)
    judge = WhisperJudge(judge_model, cache_dir=str(cache_dir(cfg)), num_beams=num_beams,
                         max_new_tokens=max_new_tokens)
    short, padded = load_encoders(judge)
    dev = judge.model.device

    # speed: both encoders per clip, interleaved
    cases = {}
    for c in clips[:speed_clips]:
        a, n = c["audio"].to(dev), c["audio_lengths"].to(dev)
        cases[f"crop {c['id']}"] = (lambda a=a, n=n: _no_grad(short, a, n))
        cases[f"30s {c['id']}"] = (lambda a=a, n=n: _no_grad(padded, a, n))
    times = time_interleaved(cases, repeats, warmup=1)
    crop_ms = [times[f"crop {c['id']}"]["median_ms"] for c in clips[:speed_clips]]
    full_ms = [times[f"30s {c['id']}"]["median_ms"] for c in clips[:speed_clips]]

    # features and transcripts
    gen_log = logging.getLogger("transformers.generation.utils")
    level = gen_log.level
    gen_log.setLevel(logging.ERROR)
    hyps: Dict[str, List] = {v: [] for v in VARIANTS}
    cos, rel = [], []
    n_short = len(clips) if short_variant_utterances is None else short_variant_utterances
    try:
        for i, c in enumerate(clips):
            a, n = c["audio"].to(dev), c["audio_lengths"].to(dev)
            with torch.inference_mode():
                crop, lengths = short(a, n)
                t = int(lengths[0])
                feats = judge.feature_extractor([c["audio"][0].numpy()], sampling_rate=judge.sample_rate,
                                                return_tensors="pt").input_features.to(dev, judge.model.dtype)
                full = judge.model.get_encoder()(input_features=feats).last_hidden_state  # [1, 1500, d]
                cut = full[:, :t]
                cos.append(float(torch.nn.functional.cosine_similarity(crop[0, :t], cut[0], dim=-1).mean()))
                rel.append(float((crop[0, :t] - cut[0]).norm() / cut[0].norm()))
                spliced = full.clone()
                spliced[:, :t] = crop[:, :t].to(full.dtype)
                enc_out = {"30s": full, "crop+tail": spliced, "crop": crop[:, :t].to(full.dtype), "30s-cut": cut}
                for v in VARIANTS if i < n_short else VARIANTS[:2]:
                    ids = judge.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc_out[v]),
                                               num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False)
                    text = judge.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()
                    hyps[v].append((c["id"], c["text"], text))
    finally:
        gen_log.setLevel(level)
    wer = {}
    for v in VARIANTS:
        if not hyps[v]:
            continue
        ids, refs, texts = zip(*hyps[v])
        score, _ = score_corpus(refs, texts, ids)
        wer[v] = {"wer": score.wer, "cer": score.cer, "words": score.ref_words, "utterances": len(hyps[v])}
    seconds = [int(c["audio_lengths"][0]) / 16000 for c in clips]
    res = {
        "judge": judge.label,
        "device": str(dev),
        "corpus": str(cfg.data.root or f"synth n{synth_num}-s0"),
        "utterances": len(clips),
        "clip_seconds": {"min": min(seconds), "median": statistics.median(seconds), "max": max(seconds)},
        "num_beams": num_beams,
        "max_new_tokens": max_new_tokens,
        "speed": {"clips": len(crop_ms), "crop_ms_median": statistics.median(crop_ms),
                  "full_30s_ms_median": statistics.median(full_ms),
                  "speedup": statistics.median([f / c for f, c in zip(full_ms, crop_ms)]), "per_clip": times},
        "features": {"cosine_mean": statistics.mean(cos), "relative_l2_mean": statistics.mean(rel)},
        "wer": wer,
        "examples": {v: hyps[v][:3] for v in VARIANTS},
        "crop_is_free": wer["crop+tail"]["wer"] <= wer["30s"]["wer"] + 0.02,
    }
    if verbose:
        print(format_table(res))
    return res


def _no_grad(encoder, a, n):
    with torch.inference_mode():
        return encoder(a, n)


def format_table(r: Dict) -> str:
    s = r["speed"]
    cs = r["clip_seconds"]
    lines = [f"Whisper encoder ({r['judge']}, {r['utterances']} test clips of {cs['min']:.1f}-{cs['max']:.1f} s, "
             f"median {cs['median']:.1f} s)",
             f"  speed ({s['clips']} clips, batch 1): crop {s['crop_ms_median']:.1f} ms, 30 s padded "
             f"{s['full_30s_ms_median']:.1f} ms, speed-up x{s['speedup']:.1f}",
             f"  features: cosine(crop, 30 s) {r['features']['cosine_mean']:.3f}, relative L2 error "
             f"{r['features']['relative_l2_mean']:.3f}",
             "  judge WER %: " + ", ".join(f"{v} {100 * w['wer']:.1f} ({w['utterances']} utts)"
                                          for v, w in r["wer"].items())]
    return "\n".join(lines)


def memory_case(case: str, params: Dict) -> Callable[[], None]:
    """``crop`` or ``30s``: the encoder on one test clip (``params``: synth_num, data_root, data_overrides,
    judge_model)."""
    from mome.config import cache_dir
    from mome.evaluation.judge import WhisperJudge

    cfg = data_config(int(params["synth_num"]), params.get("data_root"), params.get("data_overrides", ()))
    clip = load_clips(cfg, 1)[0]
    judge = WhisperJudge(params.get("judge_model", "whisper-tiny.en"), cache_dir=str(cache_dir(cfg)))
    short, padded = load_encoders(judge)
    enc = {"crop": short, "30s": padded}.get(case)
    if enc is None:
        raise ValueError(f"unknown whisper_crop case '{case}'; choose crop or 30s")
    a, n = clip["audio"].to(judge.model.device), clip["audio_lengths"].to(judge.model.device)
    return lambda: _no_grad(enc, a, n)
