"""Named metrics, summed over processes with ONE all_reduce: the micro-batch numbers of training and the sums of
validation.

``Sums`` holds named float64 tensors, each a sum with a weight of its shape (a mean is ``sum / weight``): scalars
(``add``), per-scale vectors indexed by scale name (``add_per_scale``) and any other tensor, such as the expert load
``[layers, experts]``. ``reduce_sum`` flattens a dict of tensors into one buffer in sorted key order, sums it over
the processes with one ``accelerator.reduce(..., "sum")`` and unflattens it; ``Sums.reduce`` sends every sum and
weight through it. A new metric is one ``add`` line where it is computed. The one rule: every process must add the
same keys with the same shapes, so a recorder adds each of its keys on every call, with weight 0 where it has
nothing (an empty batch, a non-finite loss).

Training (``StepStats.record``): per micro-batch the non-finite / empty-batch / stop-signal flags, the batch size
``n``, and, weighted by ``n``, the loss, the LB and z losses, the CE per scale and the expert load. After the sum
every process knows whether any process saw a NaN, an empty batch or a signal (``skipped``), so all take the same
skip/stop decision. ``Accumulator`` sums the reduced micro-batches of a logging interval (skipped ones carry no
numbers) and gives the exact global sample-weighted means. Validation (``mome.training.validation``) sums its batches
in a ``Sums`` and reduces it the same way.
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Dict, Mapping, Optional, Sequence

import torch

from mome.metrics.load import expert_load_stats


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One float64 vector: the tensors in sorted key order, each flattened."""
    return torch.cat([tensors[k].detach().double().reshape(-1).cpu() for k in sorted(tensors)]
                     + [torch.zeros(0, dtype=torch.float64)])


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of ``flatten``: tensors of ``like``'s keys and shapes read from ``flat``."""
    out, i = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = flat[i:i + n].reshape(like[k].shape).clone()
        i += n
    if i != flat.numel():
        raise ValueError(f"a buffer of {flat.numel()} values for tensors of {i} values")
    return out


def reduce_sum(accelerator, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The tensors summed over all processes with ONE all_reduce (every process passes the same keys and shapes)."""
    flat = accelerator.reduce(flatten(tensors).to(accelerator.device), reduction="sum").cpu()
    return unflatten(flat, tensors)


def _f64(value) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.detach().double().cpu()
    return torch.tensor(float(value), dtype=torch.float64)


class Sums:
    """Named float64 sums, each with a weight of its shape; per-scale keys are vectors over ``scales``."""

    def __init__(self, scales: Sequence[str] = ()):
        self.scales = list(scales)
        self.sum: Dict[str, torch.Tensor] = {}
        self.weight: Dict[str, torch.Tensor] = {}

    def add(self, key: str, value, weight: float = 1.0) -> None:
        """Add ``value * weight`` to the sum of ``key`` (a number or a tensor of any shape) and ``weight`` to its
        weight."""
        v = _f64(value) * weight
        self._add(key, v, torch.full_like(v, float(weight)))

    def add_per_scale(self, key: str, values: Mapping[str, object], weight: float) -> None:
        """``add`` for the scales in ``values`` (name -> number); the other scales get nothing (weight 0)."""
        s = torch.zeros(len(self.scales), dtype=torch.float64)
        w = torch.zeros(len(self.scales), dtype=torch.float64)
        for name, value in values.items():
            i = self.scales.index(name)
            s[i], w[i] = _f64(value) * weight, weight
        self._add(key, s, w)

    def _add(self, key: str, s: torch.Tensor, w: torch.Tensor) -> None:
        if key not in self.sum:
            self.sum[key], self.weight[key] = s.clone(), w.clone()
            return
        if self.sum[key].shape != s.shape:
            raise ValueError(f"{key}: shape {tuple(s.shape)}, expected {tuple(self.sum[key].shape)}")
        self.sum[key] += s
        self.weight[key] += w

    def __iadd__(self, other: "Sums") -> "Sums":
        self.scales = self.scales or list(other.scales)
        for key in other.sum:
            self._add(key, other.sum[key], other.weight[key])
        return self

    def __contains__(self, key: str) -> bool:
        return key in self.sum

    def total(self, key: str) -> float:
        """The sum of a scalar key."""
        return float(self.sum[key])

    def mean(self, key: str):
        """``sum / weight``: a float for a scalar key, a tensor otherwise."""
        m = self.sum[key] / self.weight[key]
        return float(m) if m.dim() == 0 else m

    def per_scale(self, key: str) -> Dict[str, float]:
        """The means of a per-scale key, for the scales with weight > 0."""
        s, w = self.sum[key], self.weight[key]
        return {name: float(s[i] / w[i]) for i, name in enumerate(self.scales) if w[i] > 0}

    def reduce(self, accelerator) -> "Sums":
        """The sums and weights summed over all processes (one all_reduce)."""
        both = {**{f"sum/{k}": v for k, v in self.sum.items()}, **{f"weight/{k}": v for k, v in self.weight.items()}}
        reduced = reduce_sum(accelerator, both)
        out = Sums(self.scales)
        out.sum = {k: reduced[f"sum/{k}"] for k in self.sum}
        out.weight = {k: reduced[f"weight/{k}"] for k in self.weight}
        return out


# ------------------------------------------------------------------------------------------------------------
# training

_NO_OUTPUT = SimpleNamespace(loss=0.0, aux={}, ce={}, expert_load=None)  # what a skipped micro-batch contributes


def skipped(reduced: Sums) -> bool:
    """Some process had a non-finite loss or an empty batch: no process runs this micro-batch's backward."""
    return reduced.total("bad") > 0 or reduced.total("empty") > 0


class StepStats:
    """The sums of one training micro-batch, as every process records them."""

    def __init__(self, scale_names: Sequence[str], load_shape: Optional[Sequence[int]]):
        self.names = list(scale_names)
        self.load_shape = tuple(load_shape) if load_shape else None

    def record(self, out, bad: bool, empty: bool, stop: bool, n: int) -> Sums:
        """``out`` = the model output (None for an empty batch). A skipped micro-batch (``bad``, ``empty``) carries
        its flags and size only: its other keys get weight 0."""
        s = Sums(self.names)
        s.add("bad", float(bad))
        s.add("empty", float(empty))
        s.add("stop", float(stop))
        s.add("n", float(n))
        w = 0.0 if out is None or bad else float(n)
        out = _NO_OUTPUT if out is None or bad else out
        aux = getattr(out, "aux", None) or {}
        s.add("loss", out.loss, w)
        s.add("lb", aux.get("lb", 0.0), w)
        s.add("z", aux.get("z", 0.0), w)
        s.add_per_scale("ce", getattr(out, "ce", None) or {}, w)
        if self.load_shape:
            s.add("expert_load", self._load(out), w)
        return s

    def _load(self, out) -> torch.Tensor:
        load = getattr(out, "expert_load", None)
        if load is None:
            return torch.zeros(self.load_shape, dtype=torch.float64)
        if tuple(load.shape) != self.load_shape:
            raise ValueError(f"expert_load has shape {tuple(load.shape)}, expected {self.load_shape}")
        return load


class Accumulator:
    """Sums of the reduced micro-batches of a logging interval (skipped ones carry no numbers)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums = Sums()
        self.t0 = time.perf_counter()
        self.steps = 0
        self.skipped_steps = 0

    def add(self, reduced: Sums) -> None:
        if not skipped(reduced):
            self.sums += reduced

    def count_step(self, stepped: bool) -> None:
        self.steps += 1
        self.skipped_steps += int(not stepped)

    def samples_per_s(self) -> float:
        n = self.sums.total("n") if "n" in self.sums else 0.0
        return n / max(time.perf_counter() - self.t0, 1e-9)

    def summary(self) -> Dict:
        """Means over the interval: loss, lb, z, ce per scale, expert-load CV per layer, samples/s."""
        s = self.sums
        rec: Dict = {"samples_per_s": self.samples_per_s()}
        if "n" not in s or s.total("n") <= 0:
            return rec
        rec["loss"] = s.mean("loss")
        rec["lb"] = s.mean("lb")
        if s.total("z"):
            rec["z"] = s.mean("z")
        rec["ce"] = s.per_scale("ce")
        if "expert_load" in s:
            rec.update(expert_load_stats(s.mean("expert_load")))
        return rec
