"""Shared set-up of the data tests: a tiny synthetic corpus generated once per session in a temporary folder."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

TINY = dict(num=16, seed=3, num_speakers=4, val_fraction=0.125, test_fraction=0.125)


@lru_cache(maxsize=None)
def session_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="mome-data-tests-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@lru_cache(maxsize=None)
def tiny_corpus() -> Path:
    """A 16-utterance corpus (4 speakers), shared by the data tests; treat it as read-only."""
    from mome.config import SynthConfig
    from mome.data.synth import generate_corpus

    return generate_corpus(session_dir() / "corpus", SynthConfig(**TINY), workers=2, progress=False)


def data_config(root: Path, *overrides: str):
    """A config over ``root`` with the tiny corpus' synth settings, a private cache and no DataLoader workers."""
    from mome.config import load_config

    synth = [f"data.synth.{k}={v}" for k, v in TINY.items()]
    return load_config(None, [f"data.root={root}", *synth, f"cache_dir={session_dir() / 'cache'}",
                              "data.num_workers=0", "data.noise.babble_speakers=4", "logging.progress=false",
                              *overrides])
