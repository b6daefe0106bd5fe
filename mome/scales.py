"""Matryoshka scales: which (task, audio rate, video rate) sequences a model trains and can decode.

A scale is written ``avsr:4x2`` (audio pooled 4x, video 2x), ``asr:16`` or ``vsr:5``. The position of a scale in
``all_scales(model_cfg)`` is its *scale id*, the integer that per-scale components (per-scale routers, scale-specific
LoRA, loss weights) index by. Scale ids travel through the model as tensors, never as mutable module state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from mome.config import TASKS


@dataclass(frozen=True)
class Scale:
    task: str
    audio_rate: Optional[int] = None
    video_rate: Optional[int] = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task '{self.task}'; choose from {', '.join(TASKS)}")
        need_a, need_v = self.task in ("asr", "avsr"), self.task in ("vsr", "avsr")
        if need_a != (self.audio_rate is not None) or need_v != (self.video_rate is not None):
            raise ValueError(f"scale for task '{self.task}' needs audio_rate={need_a}, video_rate={need_v}")

    @property
    def name(self) -> str:
        if self.task == "avsr":
            return f"avsr:{self.audio_rate}x{self.video_rate}"
        return f"{self.task}:{self.audio_rate if self.task == 'asr' else self.video_rate}"

    @property
    def uses_audio(self) -> bool:
        return self.audio_rate is not None

    @property
    def uses_video(self) -> bool:
        return self.video_rate is not None

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> "Scale":
        try:
            task, rates = text.strip().lower().split(":")
            if task == "avsr":
                a, v = rates.split("x")
                return cls("avsr", int(a), int(v))
            if task == "asr":
                return cls("asr", audio_rate=int(rates))
            if task == "vsr":
                return cls("vsr", video_rate=int(rates))
        except ValueError:
            pass
        raise ValueError(f"cannot parse scale '{text}'; write e.g. avsr:4x2, asr:16 or vsr:5")


def all_scales(model_cfg) -> List[Scale]:
    """Every scale the model config trains, in a fixed order: tasks in config order, rates in config order."""
    a_rates = list(model_cfg.compression.audio_rates)
    v_rates = list(model_cfg.compression.video_rates)
    out: List[Scale] = []
    for task in model_cfg.tasks:
        if task == "asr":
            out += [Scale("asr", audio_rate=a) for a in a_rates]
        elif task == "vsr":
            out += [Scale("vsr", video_rate=v) for v in v_rates]
        else:
            out += [Scale("avsr", a, v) for a in a_rates for v in v_rates]
    return out


def select_scales(model_cfg, names: Sequence[str]) -> List[Scale]:
    """The scales named in ``names`` (all when empty), checked against what the model trains."""
    available = all_scales(model_cfg)
    if not names:
        return available
    chosen = [Scale.parse(n) for n in names]
    for s in chosen:
        if s not in available:
            raise ValueError(f"scale '{s}' is not trained by this model; available: {', '.join(map(str, available))}")
    return chosen


def scale_id(model_cfg, scale: Scale) -> int:
    return all_scales(model_cfg).index(scale)
