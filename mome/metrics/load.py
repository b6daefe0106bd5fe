"""Expert-load statistics: how evenly a router spreads its tokens over the experts."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch


def coefficient_of_variation(load, axis: int = -1):
    """Population std / mean along ``axis`` (0 = perfectly balanced; 0 where the mean is 0).

    A tensor gives a tensor (differentiable, on its device); anything else array-like gives a float64 numpy array."""
    if isinstance(load, torch.Tensor):
        return load.std(dim=axis, unbiased=False) / load.mean(dim=axis).clamp_min(1e-12)
    a = np.asarray(load, dtype=np.float64)
    mean = a.mean(axis=axis)
    return np.divide(a.std(axis=axis), mean, out=np.zeros_like(mean), where=mean > 0)


def expert_load_stats(load: torch.Tensor) -> Dict:
    """Per-layer coefficient of variation of the expert load fractions ``[layers, experts]``, its mean, and the
    fraction of (layer, expert) pairs that received no token."""
    load = load.double()
    cv = coefficient_of_variation(load, axis=1)
    return {
        "expert_cv": [round(float(x), 5) for x in cv],
        "expert_cv_mean": float(cv.mean()),
        "dead_expert_frac": float((load <= 0).double().mean()),
    }
