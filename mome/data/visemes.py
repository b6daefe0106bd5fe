"""From eSpeak phoneme timings to per-frame mouth parameters (the articulation behind the synthetic video).

Each phoneme maps to a viseme target: jaw/lip ``open``ing (0 closed .. 1 wide), lip ``spread`` (-1 rounded and
protruded .. +1 spread), visible ``teeth`` and ``tongue`` (0..1), and two contact gestures that must show up as
distinct frames: bilabial ``closure`` (p b m: lips pressed shut) and labiodental ``tuck`` (f v: lower lip under the
upper teeth). Diphthongs move between two targets. Targets are laid on a 1 kHz timeline, smoothed (articulators
move continuously) and averaged over each 40 ms video frame. The contact gestures are applied after smoothing, so
a closure shorter than a frame still closes the lips in the frame it covers most.

eSpeak marks a stop consonant (p, b, t, k ...) at its release; the closure is the silence just before it, so the
contact interval of p and b starts up to 60 ms earlier (within the previous phoneme).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

# (open, spread, teeth, tongue)
Target = Tuple[float, float, float, float]

_REST: Target = (0.04, 0.0, 0.0, 0.0)
_BILABIAL: Target = (0.0, 0.0, 0.0, 0.0)
_LABIODENTAL: Target = (0.12, 0.15, 1.0, 0.0)
_DENTAL: Target = (0.24, 0.2, 0.8, 1.0)
_ALVEOLAR: Target = (0.2, 0.3, 0.7, 0.2)
_SIBILANT: Target = (0.1, 0.45, 1.0, 0.0)
_POSTALVEOLAR: Target = (0.16, -0.6, 0.6, 0.0)
_VELAR: Target = (0.3, 0.1, 0.3, 0.0)

_CONSONANTS: Dict[str, Target] = {
    "p": _BILABIAL, "b": _BILABIAL, "m": _BILABIAL,
    "f": _LABIODENTAL, "v": _LABIODENTAL,
    "T": _DENTAL, "D": _DENTAL,
    "t": _ALVEOLAR, "d": _ALVEOLAR, "n": _ALVEOLAR, "l": (0.26, 0.2, 0.5, 0.6), "t#": _ALVEOLAR, "d#": _ALVEOLAR,
    "s": _SIBILANT, "z": _SIBILANT,
    "S": _POSTALVEOLAR, "Z": _POSTALVEOLAR, "tS": _POSTALVEOLAR, "dZ": _POSTALVEOLAR,
    "r": (0.14, -0.5, 0.2, 0.0), "r-": (0.14, -0.5, 0.2, 0.0),
    "w": (0.07, -1.0, 0.0, 0.0), "w#": (0.07, -1.0, 0.0, 0.0),
    "j": (0.12, 0.65, 0.6, 0.0),
    "k": _VELAR, "g": _VELAR, "N": _VELAR, "x": _VELAR,
    "h": (0.35, 0.0, 0.2, 0.0), "?": (0.2, 0.0, 0.2, 0.0),
}
_VOWELS: Dict[str, Target] = {
    "i:": (0.2, 0.9, 0.8, 0.0), "i": (0.24, 0.8, 0.7, 0.0),
    "I": (0.3, 0.6, 0.6, 0.0), "I2": (0.3, 0.55, 0.5, 0.0), "I#": (0.3, 0.5, 0.5, 0.0),
    "E": (0.5, 0.5, 0.5, 0.0), "e": (0.45, 0.55, 0.5, 0.0),
    "a": (0.78, 0.4, 0.3, 0.0), "a#": (0.6, 0.2, 0.3, 0.0),
    "A:": (0.92, 0.0, 0.2, 0.0), "A": (0.9, 0.0, 0.2, 0.0),
    "V": (0.6, 0.1, 0.3, 0.0),
    "0": (0.72, -0.45, 0.1, 0.0),
    "O:": (0.58, -0.75, 0.0, 0.0), "O": (0.55, -0.7, 0.0, 0.0), "O2": (0.55, -0.7, 0.0, 0.0), "o": (0.45, -0.7, 0.0, 0.0),
    "U": (0.3, -0.7, 0.0, 0.0), "u:": (0.18, -1.0, 0.0, 0.0), "u": (0.2, -0.95, 0.0, 0.0),
    "@": (0.35, 0.0, 0.3, 0.0), "@2": (0.33, 0.0, 0.3, 0.0), "@5": (0.3, -0.2, 0.2, 0.0), "3": (0.35, -0.2, 0.3, 0.0),
    "3:": (0.35, -0.35, 0.3, 0.0), "@L": (0.3, 0.1, 0.4, 0.5),
}
# diphthongs: (first target, second target)
_DIPHTHONGS: Dict[str, Tuple[str, str]] = {
    "aI": ("a", "I"), "aI2": ("a", "I"), "aI@": ("a", "@"), "aU": ("a", "U"), "eI": ("E", "I"),
    "oU": ("o", "U"), "@U": ("@", "U"), "OI": ("O:", "I"), "i@": ("i", "@"), "i@3": ("i", "@"),
    "e@": ("E", "@"), "U@": ("U", "@"), "A@": ("A:", "@"), "O@": ("O:", "@"), "o@": ("o", "@"), "aU@": ("a", "@"),
}

CLOSURE_PHONEMES = frozenset({"p", "b", "m"})
STOP_CLOSURE_S = 0.06  # p/b: lips close this long before the release (at most 60% of the previous phoneme)


def normalize_phoneme(name: str) -> str:
    """eSpeak mnemonic without stress marks ("'eI" -> "eI", ",a" -> "a")."""
    return name.lstrip("',%=")


def viseme_targets(name: str) -> List[Target]:
    """One target (or two for a diphthong) for an eSpeak phoneme name; pauses rest, unknown names fall back to
    their longest known prefix, else a neutral vowel."""
    p = normalize_phoneme(name)
    if not p or p.startswith("_"):
        return [_REST]
    for key in (p, p.rstrip(";[:"), p.rstrip("0123456789#;[")):
        if key in _DIPHTHONGS:
            a, b = _DIPHTHONGS[key]
            return [_VOWELS[a], _VOWELS[b]]
        if key in _CONSONANTS:
            return [_CONSONANTS[key]]
        if key in _VOWELS:
            return [_VOWELS[key]]
    for n in range(len(p) - 1, 0, -1):
        for table in (_CONSONANTS, _VOWELS):
            if p[:n] in table:
                return [table[p[:n]]]
    return [_VOWELS["@"]]


@dataclass
class MouthTrack:
    """Per-frame mouth parameters, each a float32 array [T]."""

    open: np.ndarray
    spread: np.ndarray
    teeth: np.ndarray
    tongue: np.ndarray
    closure: np.ndarray  # fraction of the frame with the lips pressed shut
    tuck: np.ndarray  # fraction of the frame with the lower lip under the upper teeth

    def __len__(self) -> int:
        return len(self.open)


def _gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Smooth along the last axis with a Gaussian of ``sigma`` samples (edges repeat the boundary value)."""
    radius = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(radius, radius)], mode="edge")
    return np.stack([np.convolve(row, k, mode="valid") for row in padded.reshape(-1, padded.shape[-1])]).reshape(x.shape)


def mouth_track(phonemes: Sequence, num_frames: int, fps: int = 25, smooth_ms: float = 18.0,
                anticipation_ms: float = 20.0) -> MouthTrack:
    """Per-frame mouth parameters for ``phonemes`` (objects with ``start_s``, ``end_s``, ``phoneme``).

    ``anticipation_ms``: the lips lead the sound a little (coarticulation), so targets are shifted earlier.
    """
    res = 1000  # timeline samples per second
    n = int(round(num_frames * res / fps))
    params = np.empty((4, n), np.float32)
    params[:] = np.asarray(_REST, np.float32)[:, None]
    closure = np.zeros(n, np.float32)
    tuck = np.zeros(n, np.float32)
    shift = anticipation_ms / 1000.0
    prev_start = 0.0
    for ev in phonemes:
        start, end = max(ev.start_s - shift, 0.0), max(ev.end_s - shift, 0.0)
        a, b = int(round(start * res)), int(round(end * res))
        a, b = min(a, n), min(max(b, a), n)
        targets = viseme_targets(ev.phoneme)
        if len(targets) == 1:
            params[:, a:b] = np.asarray(targets[0], np.float32)[:, None]
        else:
            mid = (a + b) // 2
            params[:, a:mid] = np.asarray(targets[0], np.float32)[:, None]
            params[:, mid:b] = np.asarray(targets[1], np.float32)[:, None]
        base = normalize_phoneme(ev.phoneme)
        if base in CLOSURE_PHONEMES:
            if base == "m":
                c0 = a
            else:  # the stop's closure precedes its release event
                lead = min(STOP_CLOSURE_S, max(0.03, 0.6 * (start - prev_start)))
                c0 = max(0, a - int(round(lead * res)))
                b = min(b, a + int(0.005 * res))  # the lips part at the release
            closure[c0:b] = 1.0
        elif base in ("f", "v"):
            tuck[a:b] = 1.0
        prev_start = start
    params = _gaussian_smooth(params, smooth_ms * res / 1000.0)
    per = res // fps
    frames = params[:, : num_frames * per].reshape(4, num_frames, per).mean(-1)
    closure = closure[: num_frames * per].reshape(num_frames, per).mean(-1)
    tuck = tuck[: num_frames * per].reshape(num_frames, per).mean(-1)
    # contact gestures win over the smoothed opening: a frame mostly in contact is closed / tucked
    close_w = np.clip(2.0 * closure, 0.0, 1.0)
    tuck_w = np.clip(2.0 * tuck, 0.0, 1.0)
    open_ = frames[0] * (1.0 - close_w)
    open_ = open_ * (1.0 - tuck_w) + _LABIODENTAL[0] * tuck_w
    teeth = frames[2] * (1.0 - close_w)
    return MouthTrack(
        open=open_.astype(np.float32),
        spread=frames[1].astype(np.float32),
        teeth=np.maximum(teeth, tuck_w).astype(np.float32),
        tongue=(frames[3] * (1.0 - close_w)).astype(np.float32),
        closure=close_w.astype(np.float32),
        tuck=tuck_w.astype(np.float32),
    )
