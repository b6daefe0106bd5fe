"""Synthetic speakers: an eSpeak voice (accent + variant, rate, pitch) and a mouth appearance.

Speaker ``k`` is a pure function of ``k`` (its own random generator), so the first speakers of a 12-speaker corpus are
the same people as in a 20-speaker one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List

import numpy as np

# (accent, variant) of the first speakers: English accents shipped with eSpeak NG and voice variants (timbre),
# chosen for intelligibility (Whisper tiny.en WER on 24 corpus sentences at 150 wpm, pitch 50: 0.13-0.30; the
# Scottish, Caribbean and New York accents, the female variants and pitches above ~60 score 0.35-0.7). Later
# speakers reuse them with other rates, pitches and faces. "" = the accent's own voice.
VOICES = (
    ("en", "edward"), ("en-gb-x-rp", "m6"), ("en", "benjamin"), ("en-us", "adam"), ("en-gb-x-rp", "david"),
    ("en", "michel"), ("en-us", "m1"), ("en-gb-x-rp", "quincy"), ("en", "m5"), ("en-us", ""),
    ("en-gb-x-rp", "benjamin"), ("en", "max"),
)


@dataclass(frozen=True)
class Appearance:
    """How a speaker's mouth region looks (grey levels 0-255, sizes in pixels of the 96x96 crop)."""

    skin: float
    lip_delta: float  # lips are this much darker than the skin
    mouth_half_width: float
    upper_lip: float  # lip thickness at the centre
    lower_lip: float
    max_open: float  # lip aperture at open=1
    center_x: float
    center_y: float
    tilt_deg: float
    interior: float  # mouth cavity grey level
    teeth: float
    tongue: float
    texture_amp: float  # smooth skin texture amplitude
    stubble: float  # fine texture amplitude around the lips (0 = none)
    light_x: float  # linear lighting gradient across the crop (grey levels per 96 px)
    light_y: float
    noise_std: float  # per-frame sensor noise
    seed: int  # skin texture pattern


@dataclass(frozen=True)
class Speaker:
    name: str
    voice: str  # eSpeak voice with variant, e.g. "en-us+f3"
    rate: int  # words per minute
    pitch: int  # 0-100
    pitch_range: int  # 0-100
    gain: float  # waveform scale
    appearance: Appearance

    def to_dict(self) -> dict:
        return asdict(self)


def make_speaker(index: int) -> Speaker:
    rng = np.random.default_rng([0x5EEC, index])
    accent, variant = VOICES[index % len(VOICES)]
    female = bool(index % 2)  # the face only: the voices are all male variants
    u = rng.uniform
    skin = u(95, 185)
    app = Appearance(
        skin=skin,
        lip_delta=u(35, 70),
        mouth_half_width=u(26, 32) * (0.95 if female else 1.0),
        upper_lip=u(5.5, 8.5),
        lower_lip=u(7.5, 11.5),
        max_open=u(20, 26),
        center_x=48 + u(-3, 3),
        center_y=50 + u(-3, 3),
        tilt_deg=u(-4, 4),
        interior=u(12, 40),
        teeth=min(245.0, u(175, 235)),
        tongue=u(0.55, 0.75) * skin,
        texture_amp=u(2, 7),
        stubble=0.0 if female or rng.random() < 0.5 else u(5, 12),
        light_x=u(-25, 25),
        light_y=u(-15, 20),
        noise_std=u(1.5, 4.0),
        seed=int(rng.integers(2**31)),
    )
    return Speaker(
        name=f"spk{index:02d}",
        voice=f"{accent}+{variant}" if variant else accent,
        rate=int(rng.integers(140, 161)),
        pitch=int(rng.integers(40, 53)),
        pitch_range=int(rng.integers(40, 71)),
        gain=float(u(0.55, 0.95)),
        appearance=app,
    )


def make_speakers(num: int) -> List[Speaker]:
    if num < 1:
        raise ValueError(f"the corpus needs at least one speaker, got num_speakers={num}")
    return [make_speaker(k) for k in range(num)]
