"""Reproducible data order and augmentation, so that a resumed run sees exactly the batches of an uninterrupted one.

Three things would otherwise make a resumed run drift:

1. the batch plan must depend only on (seed, epoch): ``set_epoch`` is called on the loader and on every wrapped batch
   sampler, sampler and dataset (Accelerate's own ``set_epoch`` stops at its shard wrapper);
2. creating a DataLoader iterator draws worker seeds from the global RNG; ``epoch_batches`` creates it under an RNG
   pinned to (seed, epoch), so doing that mid-epoch on resume neither changes those seeds nor shifts the training
   stream that the checkpoint restored;
3. random augmentation drawn from a global (or per-worker) RNG depends on which batches were loaded before, and
   Accelerate prefetches one batch ahead; ``SeededDataset`` runs every ``dataset[i]`` under RNGs seeded by
   (seed, epoch, i), which makes each sample's augmentation a function of those three numbers only, in any process
   or worker, whatever was loaded or skipped before.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Dict, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextmanager
def pinned_rng(seed: int):
    """Run the block under python/numpy/torch RNGs seeded with ``seed``; restore the outer states afterwards."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class SeededDataset(Dataset):
    """Wraps a map-style dataset: item ``i`` of epoch ``e`` is produced under RNGs seeded by (seed, e, i).

    Attributes of the wrapped dataset (``lengths``, ``end_epoch`` ...) are reachable through the wrapper.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        with pinned_rng(mix_seed(self.seed, self.epoch, index)):
            return self.dataset[index]

    def __getattr__(self, name):
        if name in ("dataset", "seed", "epoch") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def seeded_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The same loader (batch sampler, collate, workers) over ``SeededDataset(loader.dataset, seed)``."""
    if loader.batch_sampler is None or loader.sampler is None:
        raise TypeError("seeded_loader needs a map-style DataLoader")
    kwargs = dict(batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                  pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                  multiprocessing_context=loader.multiprocessing_context, generator=loader.generator)
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    return type(loader)(SeededDataset(loader.dataset, seed), **kwargs)


def set_epoch_everywhere(loader, epoch: int) -> None:
    """``set_epoch`` on the loader and on every wrapped batch sampler / sampler / dataset that has one."""
    seen, todo = set(), [loader]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen or isinstance(obj, (int, float, str)):
            continue
        seen.add(id(obj))
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
        for attr in ("batch_sampler", "sampler", "dataset"):
            todo.append(getattr(obj, attr, None))


def epoch_batches(accelerator, loader, epoch: int, skip: int, seed: int) -> Iterator[Dict]:
    """Batches of ``epoch`` after the first ``skip`` (resume), from an iterator created under an RNG pinned to
    (seed, epoch): identical whether created at the start of the epoch or in its middle."""
    dl = accelerator.skip_first_batches(loader, skip) if skip else loader
    set_epoch_everywhere(dl, epoch)
    it = iter(dl)
    with pinned_rng(mix_seed(seed, epoch, 0x5EED)):
        try:
            first = next(it)
        except StopIteration:
            return
    yield first
    yield from it


def resume_skip(global_batches: int, saved_processes: int, processes: int) -> int:
    """Micro-batches each of ``processes`` processes skips to continue an epoch after ``global_batches`` of its
    batches were consumed by ``saved_processes`` processes.

    Accelerate shards an epoch's batch plan round-robin (process p takes batches p, p + n, p + 2n, ...), so after
    skipping ``k`` batches each of n processes has consumed exactly global batches ``0 .. k*n - 1``: ``k`` must be
    ``global_batches / processes``. A position that the new process count cannot split evenly is refused (the run
    would skip or repeat samples).
    """
    if global_batches % processes:
        ok = [m for m in range(1, min(global_batches, 64) + 1) if global_batches % m == 0]
        raise ValueError(
            f"the checkpoint stands at global batch {global_batches} of its epoch (written by {saved_processes} "
            f"process(es)), which {processes} processes cannot continue exactly (each would start at a different "
            f"sample); resume on a process count that divides {global_batches} (e.g. {', '.join(map(str, ok[-4:]))})")
    return global_batches // processes
