"""The AVSR model: encoders, Matryoshka compression, projectors, a frozen LLM and the method's adapters.

``build_model(cfg)`` builds the ``AVSRModel`` of a run config (``mome.config.load_config``): the backbones from
``cfg.model`` and the cache folder, then ``AVSRModel(cfg.model, ...)``, which sees the model config only.
``device="meta"`` builds the architecture only (no weights, no tokenizer), for parameter accounting
(``python -m mome.models describe``).
"""
from __future__ import annotations

from typing import Optional

from mome.models.avsr import AVSRModel, AVSROutput, BackboneMismatchError, RoutedCall, RoutingLog

__all__ = ["AVSRModel", "AVSROutput", "BackboneMismatchError", "RoutedCall", "RoutingLog", "build_model"]


def build_model(cfg, device: Optional[str] = None) -> AVSRModel:
    """The model of ``cfg.model`` with pretrained (or, with ``random_init``, seeded random) frozen backbones."""
    from mome.config import cache_dir
    from mome.models.backbones import load_llm_backbone
    from mome.models.encoders import build_audio_encoder, build_video_encoder
    from mome.scales import all_scales

    m = cfg.model
    scales = all_scales(m)
    cache = cache_dir(cfg)
    llm, tokenizer = load_llm_backbone(m.llm, cache, device)
    audio = build_audio_encoder(m.audio_encoder, cache, device) if any(s.uses_audio for s in scales) else None
    video = build_video_encoder(m.video_encoder, cache, device) if any(s.uses_video for s in scales) else None
    if device == "meta":
        import torch

        with torch.device("meta"):
            return AVSRModel(m, llm, tokenizer, audio, video)
    return AVSRModel(m, llm, tokenizer, audio, video)
