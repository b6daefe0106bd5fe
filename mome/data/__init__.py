"""Audio-visual data: the synthetic corpus, the LRS-style loader, transforms and noise.

``build_dataloader(cfg, split, ...)``, ``build_dataset``, ``resolve_data_root`` and friends are imported lazily, so
``mome.data.espeak`` or ``mome.data.synth`` can be used without loading torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_dataloader": "mome.data.dataset",
    "build_dataset": "mome.data.dataset",
    "collate_batch": "mome.data.dataset",
    "report_bad": "mome.data.dataset",
    "AVDataset": "mome.data.dataset",
    "AVDataLoader": "mome.data.dataset",
    "LengthBucketBatchSampler": "mome.data.dataset",
    "resolve_data_root": "mome.data.synth",
    "ensure_corpus": "mome.data.synth",
    "generate_corpus": "mome.data.synth",
    "BadInputError": "mome.data.media",
    "mix_at_snr": "mome.data.noise",
    "build_noise_source": "mome.data.noise",
}

__all__ = sorted(_EXPORTS) + ["noise"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("noise", "synth", "dataset", "transforms", "media", "manifest", "grammar", "espeak"):
        return importlib.import_module(f"mome.data.{name}")
    raise AttributeError(f"module 'mome.data' has no attribute {name!r}")
