"""A small GRID-like command grammar for the synthetic corpus.

Sentences such as ``move the red candle near k three again`` or ``take blue cup at f two``: a command verb, the
article, a colour and an object, then mostly a grid position (preposition, spelled letter, digit) and an adverb,
5 to 8 words. Compared with GRID's ``bin blue at f two now`` the sentences read more like English and avoid words that
Whisper tiny.en mishears in eSpeak's voices ("bin", "lay", "set", "now", "by", "white", "nine", b-words after
"the"); no two words sound alike. Every sentence
is a pure function of the random generator passed in.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

SLOTS: Dict[str, Tuple[str, ...]] = {
    "command": ("place", "move", "take", "drop", "push", "bring", "grab", "find"),
    "article": ("the",),
    "colour": ("blue", "green", "red", "silver", "black", "yellow", "orange", "purple"),
    # no b-words after "the" (eSpeak's "the box" is heard as "the mocks"); mostly two syllables
    "object": ("pencil", "candle", "table", "jacket", "kettle", "ladder", "window", "spoon"),
    # no "to" (it sounds like "two")
    "preposition": ("at", "over", "in", "on", "near", "under"),
    # spelled letters: the ones Whisper tiny.en tells apart in eSpeak's voices. Left out: a (article), i (pronoun),
    # o (oh = zero), w (three syllables, as in GRID), and b e j m n p v y z (each misheard 50-100% of the time)
    "letter": tuple("cdfghklqrstux"),
    # no "nine": after a letter, eSpeak's "nine" is heard as "I'm" nine times out of ten
    "digit": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight"),
    "adverb": ("again", "please", "soon", "today", "later", "quickly", "slowly"),
}

TEMPLATES: Tuple[Tuple[str, ...], ...] = (
    ("command", "article", "colour", "object", "adverb"),
    ("command", "colour", "object", "preposition", "letter", "digit"),
    ("command", "article", "object", "preposition", "letter", "digit"),
    ("command", "article", "colour", "object", "preposition", "letter", "digit"),
    ("command", "article", "object", "preposition", "letter", "digit", "adverb"),
    ("command", "article", "colour", "object", "preposition", "letter", "digit", "adverb"),
)

VOCABULARY: Tuple[str, ...] = tuple(sorted({w for words in SLOTS.values() for w in words}))


def templates_between(min_words: int, max_words: int) -> List[Tuple[str, ...]]:
    out = [t for t in TEMPLATES if min_words <= len(t) <= max_words]
    if not out:
        lengths = sorted({len(t) for t in TEMPLATES})
        raise ValueError(f"no sentence template has {min_words}-{max_words} words; the grammar offers {lengths}")
    return out


def sample_sentence(rng: np.random.Generator, min_words: int = 5, max_words: int = 8) -> str:
    """One lowercase sentence of ``min_words``..``max_words`` words."""
    templates = templates_between(min_words, max_words)
    template = templates[int(rng.integers(len(templates)))]
    return " ".join(_pick(rng, SLOTS[slot]) for slot in template)


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[int(rng.integers(len(words)))]


def spoken_form(sentence: str) -> str:
    """The text given to the speech synthesiser: a comma (a short pause) between a spelled letter and the digit
    after it, so "at c nine" is not heard as "at seen nine" (Whisper WER 0.32 -> 0.25 for one eSpeak voice)."""
    words = sentence.split()
    out: List[str] = []
    letters, digits = set(SLOTS["letter"]), set(SLOTS["digit"])
    for i, w in enumerate(words):
        if i > 0 and w in digits and words[i - 1] in letters:
            out[-1] += ","
        out.append(w)
    return " ".join(out)


def slot_words(sentence: str) -> Dict[str, str]:
    """``{slot: word}`` for a sentence of this grammar (the first template it fits), or ``ValueError``."""
    words = sentence.split()
    for template in TEMPLATES:
        if len(template) == len(words) and all(w in SLOTS[s] for s, w in zip(template, words)):
            return dict(zip(template, words))
    raise ValueError(f"{sentence!r} fits no template of mome.data.grammar")
