"""Word and character error rates, corpus level, with per-utterance records.

Normalisation (``normalize``), applied identically to references and hypotheses before scoring, one of two:

- ``strip_punctuation=False``, the reference protocol of the LRS2/LRS3 papers (auto_avsr, Llama-AVSR): lowercase,
  then split on whitespace. Nothing else (no Unicode folding, punctuation stays part of its word). The paper recipes
  use it (``eval.strip_punctuation: false``).
- ``strip_punctuation=True`` (the default, for the synthetic corpus and free text): Unicode NFKC, lowercase, every
  Unicode punctuation character (category ``P*``) becomes a space, except an apostrophe between two letters or
  digits, which is kept (``don't`` stays one word; ``'quoted'`` loses its quotes; ``well-known`` becomes
  ``well known``); then split on whitespace.

``normalisation_name`` says in words which one was used (results tables print it).

Scoring follows the papers (docs/method.md#wer): words are whitespace-separated tokens, the Levenshtein alignment comes from
jiwer, and the **corpus WER is Σ word errors / Σ reference words** over all utterances (not a mean of per-utterance
rates). CER is the same over characters (spaces between words count as characters, as jiwer does).
Rates are fractions; tables multiply by 100.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence

import jiwer

_WS = re.compile(r"\s+")


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def normalisation_name(strip_punctuation: bool) -> str:
    """The normalisation in words, for results tables."""
    if strip_punctuation:
        return "NFKC, lowercase, punctuation stripped (inner apostrophes kept), split on whitespace"
    return "reference (lowercase, split on whitespace)"


def normalize(text: str, strip_punctuation: bool = True) -> str:
    """Lowercase and split on whitespace, after NFKC and punctuation stripping when ``strip_punctuation`` (see the
    module docstring); the words come back joined by single spaces."""
    if not strip_punctuation:  # the reference protocol: text.lower().split()
        return " ".join(text.lower().split())
    chars = list(unicodedata.normalize("NFKC", text).lower())
    for i, ch in enumerate(chars):
        if not _is_punct(ch):
            continue
        inner_apostrophe = (
            ch in "'\u2019"
            and 0 < i < len(chars) - 1
            and chars[i - 1].isalnum()
            and chars[i + 1].isalnum()
        )
        chars[i] = "'" if inner_apostrophe else " "
    return _WS.sub(" ", "".join(chars)).strip()


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_LETTER_DIGIT = re.compile(r"(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_])")
_THOUSANDS_SEP = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                  "nine": "ninth", "twelve": "twelfth"}


def _ordinal(words: str) -> str:
    head, _, last = words.rpartition(" ")
    last = _ORDINAL_WORDS.get(last) or (last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return f"{head} {last}" if head else last


def number_to_words(n: int) -> str:
    """0 <= n < 10**9 in words, American style without "and" or hyphens: 2025 -> "two thousand twenty five"."""
    if not 0 <= n < 10**9:
        raise ValueError(f"{n} is outside 0..999999999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_to_words(n % 100))
    if n < 10**6:
        return number_to_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_to_words(n % 1000))
    return number_to_words(n // 10**6) + " million" + ("" if n % 10**6 == 0 else " " + number_to_words(n % 10**6))


def spell_numbers(text: str) -> str:
    """Write digits as words (for recognisers that print digits when the references spell them out).

    Letters and digits that touch are separated (``C8`` -> ``C eight``), thousands separators dropped
    (``1,000`` -> ``one thousand``), integers below a billion spelled out, ordinals too (``3rd`` -> ``third``),
    decimals read digit by digit after ``point`` (``2.5`` -> ``two point five``), longer numbers digit by digit.
    """
    text = _ORDINAL.sub(lambda m: _ordinal(number_to_words(int(m.group(1))))
                        if int(m.group(1)) < 10**9 else m.group(0), text)
    text = _THOUSANDS_SEP.sub("", _LETTER_DIGIT.sub(" ", text))

    def spell(m: "re.Match") -> str:
        whole, _, frac = m.group(0).partition(".")
        n = int(whole)
        words = number_to_words(n) if n < 10**9 and not (len(whole) > 1 and whole[0] == "0") else " ".join(
            _ONES[int(d)] for d in whole)
        if frac:
            words += " point " + " ".join(_ONES[int(d)] for d in frac)
        return words

    return _WS.sub(" ", _NUMBER.sub(spell, text)).strip()


@dataclass
class ErrorCounts:
    """Word- and character-level error counts (of one utterance, or summed over a corpus)."""

    ref_words: int
    word_errors: int
    substitutions: int
    deletions: int
    insertions: int
    ref_chars: int
    char_errors: int


COUNT_FIELDS = tuple(f.name for f in fields(ErrorCounts))


@dataclass
class UtteranceScore(ErrorCounts):
    """One utterance: raw and normalised texts plus its error counts."""

    id: str
    ref: str
    hyp: str
    ref_norm: str
    hyp_norm: str

    @property
    def wer(self) -> float:
        return self.word_errors / self.ref_words if self.ref_words else float(self.word_errors > 0)

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["wer"] = self.wer
        return d


def score_utterance(uid: str, ref: str, hyp: str, strip_punctuation: bool = True) -> UtteranceScore:
    """Error counts for one (reference, hypothesis) pair after ``normalize``.

    An empty normalised reference is an error (WER is undefined for it): the message names the utterance.
    """
    r, h = normalize(ref, strip_punctuation), normalize(hyp, strip_punctuation)
    if not r:
        raise ValueError(f"utterance '{uid}': the reference transcript is empty after normalisation ({ref!r})")
    w = jiwer.process_words(r, h if h else "")
    c = jiwer.process_characters(r, h if h else "")
    word_errors = w.substitutions + w.deletions + w.insertions
    char_errors = c.substitutions + c.deletions + c.insertions
    return UtteranceScore(
        id=uid,
        ref=ref,
        hyp=hyp,
        ref_norm=r,
        hyp_norm=h,
        ref_words=len(r.split(" ")),
        word_errors=word_errors,
        substitutions=w.substitutions,
        deletions=w.deletions,
        insertions=w.insertions,
        ref_chars=len(r),
        char_errors=char_errors,
    )


@dataclass
class CorpusScore(ErrorCounts):
    """Corpus-level totals: ``wer = word_errors / ref_words``, ``cer = char_errors / ref_chars``."""

    num_utterances: int

    @property
    def wer(self) -> float:
        return self.word_errors / self.ref_words if self.ref_words else float("nan")

    @property
    def cer(self) -> float:
        return self.char_errors / self.ref_chars if self.ref_chars else float("nan")

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["wer"], d["cer"] = self.wer, self.cer
        return d


def corpus_score(utterances: Iterable[UtteranceScore]) -> CorpusScore:
    """Sum the per-utterance counts (Σ errors / Σ reference words)."""
    utts = list(utterances)
    return CorpusScore(num_utterances=len(utts), **{f: sum(getattr(u, f) for u in utts) for f in COUNT_FIELDS})


def score_corpus(
    refs: Sequence[str],
    hyps: Sequence[str],
    ids: Optional[Sequence[str]] = None,
    strip_punctuation: bool = True,
) -> tuple[CorpusScore, List[UtteranceScore]]:
    """Score parallel lists of references and hypotheses; returns the corpus totals and per-utterance records."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(refs))]
    if len(ids) != len(refs):
        raise ValueError(f"{len(ids)} ids but {len(refs)} references")
    utts = [score_utterance(i, r, h, strip_punctuation) for i, r, h in zip(ids, refs, hyps)]
    return corpus_score(utts), utts


def wer(refs: Sequence[str], hyps: Sequence[str], strip_punctuation: bool = True) -> float:
    """Corpus WER (fraction) of parallel lists."""
    return score_corpus(refs, hyps, strip_punctuation=strip_punctuation)[0].wer


def cer(refs: Sequence[str], hyps: Sequence[str], strip_punctuation: bool = True) -> float:
    """Corpus CER (fraction) of parallel lists."""
    return score_corpus(refs, hyps, strip_punctuation=strip_punctuation)[0].cer
