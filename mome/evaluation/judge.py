"""The external judge: a pretrained Whisper (full encoder-decoder, not our model) transcribing the same audio.

It gives a reference row in every table and a reference line in every plot: how a plain off-the-shelf speech
recogniser does on exactly the utterances, noise and SNRs that our models are scored on.

* The audio is the evaluation loader's audio at the same SNR and with the same seeded noise, but without the
  waveform layer-norm (``data.transforms.normalize_waveform``) that our model's inputs get: Whisper's log-mel
  features depend on the absolute level, and it was trained on raw waveforms.
* Stock Whisper input handling: each clip is padded to 30 s by ``WhisperFeatureExtractor``; clips longer than 30 s
  are refused (short-form decoding would cut them silently).
* Batched beam search through ``WhisperForConditionalGeneration.generate`` (``num_beams``, ``max_new_tokens``),
  deterministic, English-only model (no language or task tokens), no timestamps. Its output is scored with the same
  normalisation as every other hypothesis (``mome.metrics.wer.normalize``), after writing its digits as words
  (``eval.judge_spell_numbers``, default on: Whisper prints "C8" where the references say "c eight"); the JSONL
  keeps Whisper's own text as ``hyp_raw``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

MAX_SECONDS = 30.0


class WhisperJudge:
    """``WhisperJudge(name).transcribe(waveforms) -> list[str]`` with a pretrained Whisper from ``mome.pretrained``."""

    def __init__(
        self,
        name: str = "whisper-tiny.en",
        cache_dir: Optional[str] = None,
        num_beams: int = 5,
        max_new_tokens: int = 96,
        sample_rate: int = 16000,
    ):
        from ..pretrained import load_whisper

        model, processor = load_whisper(name, dtype=torch.float32, cache_dir=cache_dir)
        if isinstance(processor, tuple):
            self.feature_extractor, self.tokenizer = processor
        else:
            self.feature_extractor, self.tokenizer = processor.feature_extractor, processor.tokenizer
        if self.feature_extractor.sampling_rate != sample_rate:
            raise ValueError(
                f"judge '{name}' expects {self.feature_extractor.sampling_rate} Hz audio, the data is {sample_rate} Hz"
            )
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.name = name
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.sample_rate = sample_rate

    @property
    def label(self) -> str:
        """``<model> (judge)``, with a local folder shown by its name (``whisper-tiny.en (judge)``)."""
        return f"{Path(str(self.name)).name or self.name} (judge)"

    @torch.inference_mode()
    def transcribe(self, waveforms: Sequence[np.ndarray], ids: Optional[Sequence[str]] = None) -> List[str]:
        too_long = [i for i, w in enumerate(waveforms) if len(w) > MAX_SECONDS * self.sample_rate]
        if too_long:
            i = too_long[0]
            name = ids[i] if ids is not None else f"#{i}"
            raise ValueError(
                f"utterance {name} is {len(waveforms[i]) / self.sample_rate:.1f} s long; the Whisper judge decodes "
                f"clips up to {MAX_SECONDS:.0f} s (set eval.judge=false or data.max_duration_s)"
            )
        feats = self.feature_extractor(
            [np.asarray(w, dtype=np.float32) for w in waveforms],
            sampling_rate=self.sample_rate,
            return_tensors="pt",
            return_attention_mask=True,
        )
        dev = self.model.device
        # Whisper's generate sets max_length / suppress tokens itself and warns about it on every call: quiet it
        gen_log = logging.getLogger("transformers.generation.utils")
        level = gen_log.level
        gen_log.setLevel(logging.ERROR)
        try:
            ids_out = self.model.generate(
                feats.input_features.to(dev, self.model.dtype),
                attention_mask=feats.attention_mask.to(dev),
                num_beams=self.num_beams,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
            )
        finally:
            gen_log.setLevel(level)
        return [t.strip() for t in self.tokenizer.batch_decode(ids_out, skip_special_tokens=True)]
