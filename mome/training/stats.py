"""Per-micro-batch numbers, agreed across processes with ONE all_reduce, and their running means for logging.

The vector of a micro-batch holds: the sample-weighted loss, the non-finite flag, the empty-batch flag, the stop-signal
flag, the batch size, the sample-weighted LB and z losses, the per-scale CE (weighted) and presence counts, and the
flattened expert load ``[layers, experts]``. After the sum over processes every process knows whether any process saw
a NaN, an empty batch or a signal, and the logs hold exact global means.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import torch

from mome.metrics.load import expert_load_stats

LOSS, BAD, EMPTY, STOP, N, LB, Z = range(7)
_FIXED = 7


class StepStats:
    def __init__(self, scale_names: Sequence[str], load_shape: Optional[Sequence[int]]):
        self.names: List[str] = list(scale_names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.load_shape = tuple(load_shape) if load_shape else None
        self.n_load = (self.load_shape[0] * self.load_shape[1]) if self.load_shape else 0
        self.size = _FIXED + 2 * len(self.names) + self.n_load

    def pack(self, out, bad: bool, empty: bool, stop: bool, n: int) -> torch.Tensor:
        """The vector of one micro-batch (``out`` = the model output, None for an empty batch)."""
        S = len(self.names)
        v = torch.zeros(self.size, dtype=torch.float64)
        v[BAD], v[EMPTY], v[STOP], v[N] = float(bad), float(empty), float(stop), float(n)
        if out is None or bad:
            return v
        v[LOSS] = float(out.loss.detach()) * n
        aux = getattr(out, "aux", None) or {}
        if "lb" in aux:
            v[LB] = float(aux["lb"].detach()) * n
        if "z" in aux:
            v[Z] = float(aux["z"].detach()) * n
        for name, ce in (getattr(out, "ce", None) or {}).items():
            i = self.index[name]
            v[_FIXED + i] = float(ce.detach()) * n
            v[_FIXED + S + i] = n
        load = getattr(out, "expert_load", None)
        if self.n_load and load is not None:
            if tuple(load.shape) != self.load_shape:
                raise ValueError(f"expert_load has shape {tuple(load.shape)}, expected {self.load_shape}")
            v[_FIXED + 2 * S:] = load.detach().double().reshape(-1).cpu() * n
        return v


class Accumulator:
    """Sums of the reduced vectors over the micro-batches of a logging interval (skipped ones carry no numbers)."""

    def __init__(self, stats: StepStats):
        self.stats = stats
        self.reset()

    def reset(self) -> None:
        self.sum = torch.zeros(self.stats.size, dtype=torch.float64)
        self.t0 = time.perf_counter()
        self.steps = 0
        self.skipped_steps = 0

    def add(self, reduced: torch.Tensor) -> None:
        if reduced[BAD] == 0 and reduced[EMPTY] == 0:
            self.sum += reduced

    def samples_per_s(self) -> float:
        return float(self.sum[N]) / max(time.perf_counter() - self.t0, 1e-9)

    def summary(self) -> Dict:
        """Means over the interval: loss, lb, z, ce per scale, expert-load CV per layer, samples/s."""
        s, S = self.sum, len(self.stats.names)
        n = float(s[N])
        rec: Dict = {"samples_per_s": self.samples_per_s()}
        if n <= 0:
            return rec
        rec["loss"] = float(s[LOSS]) / n
        rec["lb"] = float(s[LB]) / n
        if float(s[Z]):
            rec["z"] = float(s[Z]) / n
        rec["ce"] = {name: float(s[_FIXED + i]) / float(s[_FIXED + S + i])
                     for i, name in enumerate(self.stats.names) if float(s[_FIXED + S + i]) > 0}
        if self.stats.n_load:
            rec.update(expert_load_stats(s[_FIXED + 2 * S:].reshape(self.stats.load_shape) / n))
        return rec
