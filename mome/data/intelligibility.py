"""Is the synthetic speech intelligible? Transcribe a corpus split with the pretrained Whisper and score the WER.

    python -m mome.data.intelligibility --config configs/demo.yaml [--split test] [--max N]

Whisper writes digits as numerals and letters in capitals with punctuation ("Place blue at F2 now."), so
hypotheses and references are normalised the same way: lowercase, numerals spelled digit by digit, letters split
from digits, punctuation dropped, and same-sounding spellings of letters and digits ("age" for h, "for" for four)
mapped back; the CLI also prints the WER without that last step. For speed the encoder's positional table is cropped to a 10 s window (or the
longest clip of the batch); stock Whisper pads every clip to 30 s. On eSpeak sentences a 10 s window gives the same
WER as 30 s within noise; much shorter windows make greedy decoding loop.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Whisper often writes a spelled letter or a digit as a same-sounding word ("age four" for "h four", "for" for
# "four"). None of these words is in the corpus vocabulary, so mapping them back never turns a right word wrong.
HOMOPHONES = {
    "bee": "b", "be": "b", "see": "c", "sea": "c", "dee": "d", "eff": "f", "gee": "g", "age": "h", "aitch": "h",
    "jay": "j", "kay": "k", "el": "l", "elle": "l", "em": "m", "en": "n", "oh": "o", "owe": "o", "pee": "p",
    "pea": "p", "queue": "q", "cue": "q", "are": "r", "ar": "r", "our": "r", "ess": "s", "tea": "t", "tee": "t", "you": "u",
    "vee": "v", "ex": "x", "why": "y", "zed": "z", "zee": "z", "for": "four", "won": "one", "ate": "eight",
    "too": "two",
}


def normalize_transcript(text: str, homophones: bool = True) -> str:
    """lowercase words; numerals spelled out digit by digit ("F2" -> "f two", "29" -> "two nine"); with
    ``homophones`` the same-sounding spellings of letters and digits in ``HOMOPHONES`` mapped back."""
    t = text.lower()
    t = re.sub(r"(?<=[a-z])(?=\d)|(?<=\d)(?=[a-z])", " ", t)
    t = re.sub(r"\d", lambda m: f" {_DIGITS[int(m.group())]} ", t)
    t = re.sub(r"[^a-z' ]+", " ", t).replace("'", "")
    words = t.split()
    if homophones:
        words = [HOMOPHONES.get(w, w) for w in words]
    return " ".join(words)


def corpus_wer(refs: Sequence[str], hyps: Sequence[str], homophones: bool = True) -> float:
    """Word errors over all utterances divided by the reference words (after ``normalize_transcript``)."""
    import jiwer

    r = [normalize_transcript(x, homophones) for x in refs]
    h = [normalize_transcript(x, homophones) for x in hyps]
    return float(jiwer.wer(r, h))


class WhisperTranscriber:
    """Greedy Whisper transcription of 16 kHz clips, batched, with the encoder cropped to the batch length."""

    def __init__(self, name: str = "whisper-tiny.en", cache_dir=None, window_s: float = 10.0):
        import torch

        from mome.pretrained import load_whisper

        self.torch = torch
        self.model, self.processor = load_whisper(name, cache_dir=cache_dir)
        enc = self.model.model.encoder
        self._full_positions = enc.embed_positions.weight.detach().clone()
        self._full_max = self.model.config.max_source_positions
        self.hop = self.processor.feature_extractor.hop_length  # 160 samples per mel frame
        self.window_s = window_s  # encoder window: at least this long (30 = stock Whisper), else the longest clip

    def _crop(self, positions: int) -> None:
        torch = self.torch
        enc = self.model.model.encoder
        positions = min(positions, self._full_max)
        self.model.config.max_source_positions = positions
        enc.config.max_source_positions = positions
        enc.embed_positions = torch.nn.Embedding(positions, self._full_positions.shape[1])
        enc.embed_positions.weight.data.copy_(self._full_positions[:positions])
        enc.embed_positions.requires_grad_(False)

    def __call__(self, audios: Sequence[np.ndarray], batch_size: int = 16, max_new_tokens: int = 48) -> List[str]:
        torch = self.torch
        out: List[str] = []
        for k in range(0, len(audios), batch_size):
            chunk = [np.asarray(a, np.float32) for a in audios[k:k + batch_size]]
            longest = max(len(a) for a in chunk) + 8000  # 0.5 s of trailing silence
            longest = max(longest, int(self.window_s * 16000))
            positions = -(-longest // (2 * self.hop))  # encoder positions (mel frames / 2)
            feats = self.processor.feature_extractor(chunk, sampling_rate=16000, return_tensors="pt").input_features
            feats = feats[..., : 2 * positions]
            self._crop(positions)
            with torch.no_grad():
                # no_repeat_ngram_size: stops the rare greedy loop ("3.5.0.0.0.0 ...") on a short clip
                ids = self.model.generate(feats, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                          no_repeat_ngram_size=3)
            texts = [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
            for j, text in enumerate(texts):
                if _looping(text, len(chunk[j]) / 16000) and positions < self._full_max:  # Whisper's own remedy: decode again, here
                    self._crop(self._full_max)                     # with the stock 30 s window
                    feats30 = self.processor.feature_extractor([chunk[j]], sampling_rate=16000,
                                                               return_tensors="pt").input_features
                    with torch.no_grad():
                        again = self.model.generate(feats30, max_new_tokens=max_new_tokens, do_sample=False,
                                                    num_beams=1, no_repeat_ngram_size=3)
                    texts[j] = self.processor.batch_decode(again, skip_special_tokens=True)[0].strip()
            out += texts
        return out


def _looping(text: str, seconds: float) -> bool:
    """A degenerate hypothesis: repetitive (gzip compression ratio above 2.4, Whisper's fallback rule) or more
    than 6 words per second of audio."""
    import zlib

    data = text.encode("utf-8")
    if len(data) > 20 and len(data) / len(zlib.compress(data)) > 2.4:
        return True
    return len(normalize_transcript(text).split()) > 6 * seconds + 2


def transcribe_split(root, csv_path, max_utterances: int = 0, name: str = "whisper-tiny.en",
                     cache_dir=None) -> Tuple[List[str], List[str], List[str]]:
    """(ids, references, hypotheses) for the first ``max_utterances`` rows of a label CSV (0 = all)."""
    from mome.data.manifest import read_manifest
    from mome.data.media import read_audio

    rows = read_manifest(csv_path)
    if max_utterances > 0:
        rows = rows[:max_utterances]
    audios = [read_audio(r.audio_path(root)) for r in rows]
    hyps = WhisperTranscriber(name, cache_dir)(audios)
    return [r.utt_id for r in rows], [r.text for r in rows], hyps


def main(argv: Optional[Sequence[str]] = None) -> float:
    from mome.config import cache_dir, config_argparser, config_from_args
    from mome.data.synth import ensure_corpus

    parser = config_argparser("Whisper WER of a corpus split (intelligibility of the synthetic speech).")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--max", type=int, default=0, help="first N utterances (0 = all)")
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--show", type=int, default=10, help="print this many worst utterances")
    parser.add_argument("--dump", default=None, help="write (id, reference, hypothesis) rows as JSON lines here")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    root = ensure_corpus(cfg)
    csv = Path(getattr(cfg.data, f"{args.split}_csv"))
    csv = csv if csv.is_absolute() else root / csv
    t0 = time.perf_counter()
    ids, refs, hyps = transcribe_split(root, csv, args.max, args.model, cache_dir(cfg))
    if args.dump:
        import json

        Path(args.dump).write_text("".join(json.dumps({"id": i, "ref": r, "hyp": h}) + "\n"
                                           for i, r, h in zip(ids, refs, hyps)))
    wer = corpus_wer(refs, hyps)
    strict = corpus_wer(refs, hyps, homophones=False)
    import jiwer

    per = sorted(((jiwer.wer(normalize_transcript(r), normalize_transcript(h)), i, r, h)
                  for i, r, h in zip(ids, refs, hyps)), reverse=True)
    for w, i, r, h in per[: args.show]:
        print(f"{w:.2f}  {i}  ref: {r}  hyp: {h}")
    print(f"{args.model} on {len(ids)} utterances of {csv}: WER {wer:.3f} "
          f"(without mapping letter/digit homophones: {strict:.3f}; {time.perf_counter() - t0:.0f} s)")
    return wer


if __name__ == "__main__":
    main()
