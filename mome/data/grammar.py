"""A small GRID-like command grammar for the synthetic corpus.

Sentences such as ``place blue at f two now`` or ``move the white ball near k three again``: a command verb, an
optional article and object, a colour, a preposition, a spelled letter, a digit and an optional adverb, 5 to 8
words. Every sentence is a pure function of the random generator passed in.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

SLOTS: Dict[str, Tuple[str, ...]] = {
    "command": ("bin", "lay", "place", "set", "put", "move", "take", "drop"),
    "article": ("the",),
    "colour": ("blue", "green", "red", "white", "black", "yellow", "pink"),
    "object": ("box", "ball", "cup", "book", "card", "key"),
    "preposition": ("at", "by", "in", "with", "on", "near"),
    # spelled letters; a (article), i (pronoun) and w (three syllables, as in GRID) are left out
    "letter": tuple("bcdefghjklmnopqrstuvxyz"),
    "digit": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "adverb": ("again", "now", "please", "soon", "today", "later"),
}

TEMPLATES: Tuple[Tuple[str, ...], ...] = (
    ("command", "colour", "preposition", "letter", "digit"),
    ("command", "colour", "preposition", "letter", "digit", "adverb"),
    ("command", "colour", "object", "preposition", "letter", "digit"),
    ("command", "colour", "object", "preposition", "letter", "digit", "adverb"),
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
