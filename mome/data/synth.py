"""The synthetic audio-visual corpus: eSpeak NG speech and a rendered mouth video per sentence.

For utterance ``i`` of a corpus with seed ``s`` (everything a pure function of ``(s, i)``, independent of the
number of worker processes):

1. a GRID-like sentence (``mome.data.grammar``) and a speaker (``mome.data.speakers``: eSpeak accent + variant,
   rate, pitch, and a mouth appearance);
2. eSpeak speech at 16 kHz with phoneme timings (``mome.data.espeak``), a little silence before and after, cut to a
   whole number of 40 ms frames (640 samples each) and stored as 16-bit PCM wav;
3. a 25 fps 96x96 grayscale mouth video rendered from the phoneme timings (``mome.data.visemes``,
   ``mome.data.render``), stored as H.264 mp4 next to the wav: ``<root>/synth/<speaker>/<i:06d>.{mp4,wav}``;
4. label CSVs ``train.csv``, ``val.csv``, ``test.csv`` in the auto_avsr layout (``mome.data.manifest``), with an
   option to hold out the last speakers for test, ``utterances.jsonl`` (text, speaker, phoneme timings),
   ``speakers.json``, and finally the ``COMPLETE`` marker.

A corpus whose ``COMPLETE`` marker matches the request is reused; an interrupted one resumes (media files are
written under temporary names and renamed). Usage::

    python -m mome.data.synth --config configs/demo.yaml            # cfg.data.synth, into resolve_data_root(cfg)
    python -m mome.data.synth --out /tmp/corpus --num 200 --seed 1  # explicit folder and size
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf

from mome.config import SynthConfig, cache_dir
from mome.data.grammar import sample_sentence, spoken_form
from mome.data.manifest import ManifestRow, write_manifest
from mome.data.media import FPS, SAMPLE_RATE, quantize_pcm16, write_video, write_wav
from mome.data.speakers import Speaker, make_speakers

log = logging.getLogger(__name__)

DATASET_NAME = "synth"
GENERATOR_VERSION = 3  # bump when the media for a given (seed, index) change
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
MARKER = "COMPLETE"


def check_spec(spec: SynthConfig) -> SynthConfig:
    """``spec`` (what a corpus is made of: ``data.synth``), or ``ValueError`` naming the setting that cannot work."""
    if spec.num < 1:
        raise ValueError(f"data.synth.num must be >= 1, got {spec.num}")
    if not 0 <= spec.val_fraction < 1 or not 0 <= spec.test_fraction < 1 or spec.val_fraction + spec.test_fraction >= 1:
        raise ValueError(f"data.synth val_fraction={spec.val_fraction} and test_fraction={spec.test_fraction} "
                         "must be in [0, 1) and leave room for training")
    if not 0 <= spec.holdout_speakers < spec.num_speakers:
        raise ValueError(f"data.synth.holdout_speakers={spec.holdout_speakers} must be in "
                         f"[0, num_speakers={spec.num_speakers})")
    return spec


def media_key(spec: SynthConfig) -> dict:
    """The settings that decide the media files (a changed one means a new corpus)."""
    return {"version": GENERATOR_VERSION, "num": spec.num, "seed": spec.seed, "num_speakers": spec.num_speakers,
            "min_words": spec.min_words, "max_words": spec.max_words}


def split_key(spec: SynthConfig) -> dict:
    """The settings that decide only the split CSVs."""
    return {"val_fraction": spec.val_fraction, "test_fraction": spec.test_fraction,
            "holdout_speakers": spec.holdout_speakers}


def spec_from_config(cfg) -> SynthConfig:
    return check_spec(OmegaConf.to_object(cfg.data.synth))


def default_root(cache: str | os.PathLike, spec: SynthConfig) -> Path:
    """``<cache>/synth/n{num}-s{seed}-{key}``: the key hashes everything that shapes the media (generator version,
    speakers, sentence lengths), so a changed generator or setting gets a fresh folder instead of a stale corpus."""
    key = hashlib.sha1(json.dumps(media_key(spec), sort_keys=True).encode()).hexdigest()[:8]
    return Path(cache).expanduser() / "synth" / f"n{spec.num}-s{spec.seed}-{key}"


def resolve_data_root(cfg) -> Path:
    """The media root of ``cfg.data``: ``cfg.data.root`` when set, else the synthetic corpus in the cache."""
    if cfg.data.root:
        return Path(cfg.data.root).expanduser()
    if cfg.data.dataset != "synth":
        raise ValueError("data.root is empty: set it to the LRS folder (auto_avsr layout) when data.dataset=lrs")
    return default_root(cache_dir(cfg), spec_from_config(cfg))


# ------------------------------------------------------------------------------------------------------------------
# one utterance


@dataclass(frozen=True)
class UtterancePlan:
    index: int
    text: str
    speaker: int

    @property
    def rel_path(self) -> str:
        return f"spk{self.speaker:02d}/{self.index:06d}.mp4"


def plan_utterance(spec: SynthConfig, index: int) -> UtterancePlan:
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, index]).spawn(3)[0])
    text = sample_sentence(rng, spec.min_words, spec.max_words)
    return UtterancePlan(index=index, text=text, speaker=int(rng.integers(spec.num_speakers)))


def _shift_phonemes(phonemes, offset_s: float):
    from mome.data.espeak import PhonemeEvent

    return [PhonemeEvent(p.start_s + offset_s, p.end_s + offset_s, p.phoneme) for p in phonemes]


def synthesize_utterance(plan: UtterancePlan, speaker: Speaker, seed: int):
    """(audio float32 [T*640] already PCM16-exact, frames uint8 [T, 96, 96], phonemes) for one plan."""
    from mome.data.espeak import ESpeak
    from mome.data.render import render_mouth
    from mome.data.visemes import mouth_track

    _, audio_ss, video_ss = np.random.SeedSequence([seed, plan.index]).spawn(3)
    arng, vrng = np.random.default_rng(audio_ss), np.random.default_rng(video_ss)
    speech = ESpeak().synthesize(spoken_form(plan.text), voice=speaker.voice, rate=speaker.rate, pitch=speaker.pitch,
                                 pitch_range=speaker.pitch_range)
    lead = int(arng.uniform(0.0, 0.12) * SAMPLE_RATE)
    tail = int(arng.uniform(0.05, 0.15) * SAMPLE_RATE)
    n = lead + len(speech.audio) + tail
    num_frames = -(-n // SAMPLES_PER_FRAME)
    audio = np.zeros(num_frames * SAMPLES_PER_FRAME, np.float32)
    gain = speaker.gain * arng.uniform(0.85, 1.1)
    audio[lead: lead + len(speech.audio)] = speech.audio * gain
    audio = quantize_pcm16(audio)
    phonemes = _shift_phonemes(speech.phonemes, lead / SAMPLE_RATE)
    frames = render_mouth(mouth_track(phonemes, num_frames, FPS), speaker.appearance, vrng, FPS)
    return audio, frames, phonemes


_WORKER: Dict[str, object] = {}


def _init_worker(spec: SynthConfig, media_dir: str) -> None:
    _WORKER.update(spec=spec, media_dir=Path(media_dir), speakers=make_speakers(spec.num_speakers))


def _generate_one(index: int) -> dict:
    spec: SynthConfig = _WORKER["spec"]  # type: ignore[assignment]
    speakers: List[Speaker] = _WORKER["speakers"]  # type: ignore[assignment]
    plan = plan_utterance(spec, index)
    video_path = Path(_WORKER["media_dir"]) / plan.rel_path
    meta_path = video_path.with_suffix(".json")
    if meta_path.exists() and video_path.exists() and video_path.with_suffix(".wav").exists():
        return json.loads(meta_path.read_text())  # resumed run: this one is done
    video_path.parent.mkdir(parents=True, exist_ok=True)
    audio, frames, phonemes = synthesize_utterance(plan, speakers[plan.speaker], spec.seed)
    write_wav(video_path.with_suffix(".wav"), audio)
    write_video(video_path, frames)
    meta = {
        "index": index, "id": f"{DATASET_NAME}/{plan.rel_path[:-4]}", "rel_path": plan.rel_path,
        "speaker": speakers[plan.speaker].name, "text": plan.text, "frames": int(len(frames)),
        "samples": int(len(audio)), "phonemes": [[round(p.start_s, 4), round(p.end_s, 4), p.phoneme] for p in phonemes],
    }
    tmp = meta_path.with_name(f".{meta_path.name}.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)  # written last: its presence means the utterance is complete
    return meta


# ------------------------------------------------------------------------------------------------------------------
# the corpus


def assign_splits(spec: SynthConfig, metas: Sequence[dict]) -> Dict[str, List[dict]]:
    """train / val / test lists (sorted by index). With ``holdout_speakers = k`` the last k speakers form the test
    split alone; otherwise ``test_fraction`` of all utterances do. ``val_fraction`` is of the whole corpus."""
    metas = sorted(metas, key=lambda m: m["index"])
    held = {f"spk{k:02d}" for k in range(spec.num_speakers - spec.holdout_speakers, spec.num_speakers)}
    rng = np.random.default_rng([spec.seed, 0x5917])
    if spec.holdout_speakers:
        test = [m for m in metas if m["speaker"] in held]
        rest = [m for m in metas if m["speaker"] not in held]
        n_test = 0
    else:
        test, rest = [], list(metas)
        n_test = int(round(spec.test_fraction * len(metas)))
    n_val = int(round(spec.val_fraction * len(metas)))
    order = rng.permutation(len(rest))
    test_idx, val_idx = set(order[:n_test].tolist()), set(order[n_test:n_test + n_val].tolist())
    test += [m for k, m in enumerate(rest) if k in test_idx]
    val = [m for k, m in enumerate(rest) if k in val_idx]
    train = [m for k, m in enumerate(rest) if k not in test_idx and k not in val_idx]
    key = lambda m: m["index"]  # noqa: E731
    return {"train": sorted(train, key=key), "val": sorted(val, key=key), "test": sorted(test, key=key)}


def _manifest_row(meta: dict) -> ManifestRow:
    return ManifestRow(DATASET_NAME, meta["rel_path"], meta["frames"], str(len(meta["text"].split())), meta["text"])


def write_splits(root: Path, spec: SynthConfig, metas: Sequence[dict]) -> Dict[str, int]:
    splits = assign_splits(spec, metas)
    for name, items in splits.items():
        write_manifest(root / f"{name}.csv", [_manifest_row(m) for m in items])
    return {name: len(items) for name, items in splits.items()}


def read_marker(root: Path) -> Optional[dict]:
    p = Path(root) / MARKER
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # concurrent callers (e.g. two training processes) wait here
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _iterate(indices: Sequence[int], spec: SynthConfig, media_dir: Path, workers: int) -> Iterator[dict]:
    if workers <= 1 or len(indices) < 4:
        _init_worker(spec, str(media_dir))
        yield from map(_generate_one, indices)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    chunk = max(1, min(16, len(indices) // (workers * 8)))
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec, str(media_dir))) as pool:
        yield from pool.imap_unordered(_generate_one, indices, chunksize=chunk)


def generate_corpus(root: str | os.PathLike, spec: SynthConfig, workers: int = 2, force: bool = False,
                    progress: bool = True) -> Path:
    """Generate (or reuse, or resume) the corpus in ``root``; returns ``root``."""
    check_spec(spec)
    root = Path(root).expanduser()
    with _locked(root):
        marker = read_marker(root)
        if marker is not None and not force:
            if marker.get("media") == media_key(spec):
                if marker.get("splits") != split_key(spec):
                    metas = [json.loads(line) for line in (root / "utterances.jsonl").read_text().splitlines()]
                    counts = write_splits(root, spec, metas)
                    _write_marker(root, spec, counts, marker.get("seconds", 0.0))
                    log.info("re-split the corpus in %s: %s", root, counts)
                return root
            raise FileExistsError(
                f"{root} holds a synthetic corpus made with {marker.get('media')}, not {media_key(spec)}; "
                "choose another data.root or regenerate with --force")
        media_dir = root / DATASET_NAME
        if force or (marker is None and _stale(root, spec)):
            for p in (root / MARKER, root / "utterances.jsonl"):
                p.unlink(missing_ok=True)
            shutil.rmtree(media_dir, ignore_errors=True)
        (root / "GENERATING").write_text(json.dumps({"media": media_key(spec)}))
        t0 = time.perf_counter()
        metas = []
        bar = _progress(spec.num, progress)
        for meta in _iterate(list(range(spec.num)), spec, media_dir, workers):
            metas.append(meta)
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - t0
        metas.sort(key=lambda m: m["index"])
        speakers = make_speakers(spec.num_speakers)
        (root / "speakers.json").write_text(json.dumps([s.to_dict() for s in speakers], indent=1))
        tmp = root / ".utterances.jsonl.tmp"
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metas))
        os.replace(tmp, root / "utterances.jsonl")
        counts = write_splits(root, spec, metas)
        _write_marker(root, spec, counts, seconds)
        (root / "GENERATING").unlink(missing_ok=True)
        log.info("generated %d utterances in %.1f s with %d workers into %s", spec.num, seconds, workers, root)
    return root


def _stale(root: Path, spec: SynthConfig) -> bool:
    """An unfinished earlier run for different media: its files must go."""
    p = root / "GENERATING"
    if not p.is_file():
        return (root / DATASET_NAME).exists()  # media without any record of what made them
    try:
        return json.loads(p.read_text()).get("media") != media_key(spec)
    except json.JSONDecodeError:
        return True


def _write_marker(root: Path, spec: SynthConfig, counts: Dict[str, int], seconds: float) -> None:
    data = {"media": media_key(spec), "splits": split_key(spec), "counts": counts, "seconds": round(seconds, 2),
            "dataset_name": DATASET_NAME}
    tmp = root / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, root / MARKER)


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="synth", unit="utt", disable=not enabled or not sys.stderr.isatty())
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


def ensure_corpus(cfg) -> Path:
    """For ``data.dataset=synth``: the corpus of ``cfg`` (generated on first use). Other datasets: the root."""
    root = resolve_data_root(cfg)
    if cfg.data.dataset != "synth":
        return root
    spec = spec_from_config(cfg)
    marker = read_marker(root)
    if marker is not None and marker.get("media") == media_key(spec) and marker.get("splits") == split_key(spec):
        return root
    # our own cache folder is regenerated when the request changed; a user-given data.root is never overwritten
    force = not cfg.data.root and marker is not None and marker.get("media") != media_key(spec)
    if force:
        log.warning("regenerating the synthetic corpus in %s (it was made with %s)", root, marker.get("media"))
    return generate_corpus(root, spec, workers=cfg.data.synth.workers, force=force, progress=cfg.logging.progress)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    from mome.config import config_argparser, config_from_args

    parser = config_argparser("Generate the synthetic audio-visual corpus (eSpeak NG speech + rendered mouth video).")
    parser.add_argument("--out", default=None, help="corpus folder (default: data.root, else <cache>/synth/n{num}-s{seed}-<settings hash>)")
    parser.add_argument("--num", type=int, default=None, help="utterances (overrides data.synth.num)")
    parser.add_argument("--seed", type=int, default=None, help="seed (overrides data.synth.seed)")
    parser.add_argument("--workers", type=int, default=None, help="processes (overrides data.synth.workers)")
    parser.add_argument("--force", action="store_true", help="regenerate even if a complete corpus exists")
    args = parser.parse_args(argv)
    for flag, key in (("num", "data.synth.num"), ("seed", "data.synth.seed"), ("workers", "data.synth.workers"),
                      ("out", "data.root")):
        value = getattr(args, flag)
        if value is not None:
            args.overrides.append(f"{key}={value}")
    cfg = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = spec_from_config(cfg)
    root = resolve_data_root(cfg)
    t0 = time.perf_counter()
    generate_corpus(root, spec, workers=cfg.data.synth.workers, force=args.force, progress=cfg.logging.progress)
    marker = read_marker(root) or {}
    print(f"corpus: {root}  splits: {marker.get('counts')}  ({time.perf_counter() - t0:.1f} s)")
    return root


if __name__ == "__main__":
    main()
