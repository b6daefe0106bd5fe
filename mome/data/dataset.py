"""Audio-visual dataset, length-bucketed batching and collation for LRS2/LRS3 (auto_avsr layout) and our corpus.

A sample is a mouth-ROI video (decord, exact frame count) and its 16 kHz wav, cut or zero-padded to 640 samples
per frame (auto_avsr's rule), transformed (``mome.data.transforms``). A batch (``collate_batch``) is::

    ids            list[str]                          utterance ids ("<dataset>/<rel_path without .mp4>")
    text           list[str]                          lowercase transcripts
    audio          FloatTensor [B, S_max]             zero-padded, S = 640 * frames
    audio_lengths  LongTensor  [B]                    samples
    video          FloatTensor [B, T_max, 1, 88, 88]  zero-padded
    video_lengths  LongTensor  [B]                    frames

Bad input (missing, empty, undecodable or truncated media, a video without frames, audio much shorter than its
video, an empty transcript) raises ``BadInputError`` naming the file and the problem, or, with
``data.skip_bad=true``, is skipped, counted, and reported at the end of the epoch (``report_bad``). Missing or
empty files and empty transcripts are found when the dataset is built (the same in every process) and left out;
the rest when a sample is read, in every epoch (leaving them out of later epochs would give the processes of a
distributed run different batch plans). With skip_bad a batch whose every sample was bad comes out as ``None``
(``AVDataLoader`` drops it; a loader re-made by Accelerate passes it on).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mome.config import parse_snr
from mome.data.manifest import ManifestRow, read_manifest
from mome.data.media import BAD_KINDS, BadInputError, align_audio, read_audio, read_video
from mome.data.transforms import AudioTransform, VideoTransform

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = 640


class AVDataset(Dataset):
    """Utterances of one label CSV. ``__getitem__`` gives a dict (id, text, audio [S], video [T, 1, C, C]) or, for a
    bad sample with ``skip_bad``, None."""

    def __init__(self, root: str | Path, csv_path: str | Path, video_transform: VideoTransform,
                 audio_transform: AudioTransform, skip_bad: bool = False, max_frames: int = 0,
                 max_utterances: int = 0, fps: int = 25, sample_rate: int = 16000, seed: int = 0):
        self.root, self.csv_path = Path(root), Path(csv_path)
        self.video_transform, self.audio_transform = video_transform, audio_transform
        self.skip_bad = skip_bad
        self.seed = seed
        if sample_rate % fps or sample_rate // fps != SAMPLES_PER_FRAME:
            raise ValueError(f"audio/video rates {sample_rate}/{fps} do not give {SAMPLES_PER_FRAME} samples per frame")
        self.sample_rate = sample_rate
        rows = read_manifest(self.csv_path)
        self.dropped_long = 0
        if max_frames > 0:
            kept = [r for r in rows if r.frames <= max_frames]
            self.dropped_long = len(rows) - len(kept)
            if self.dropped_long:
                log.info("%s: dropped %d utterances longer than %d frames", self.csv_path, self.dropped_long, max_frames)
            rows = kept
        self.initial_bad: List[Tuple[str, str, str]] = []  # (path, kind, message) found at construction
        good = []
        for row in rows:
            problem = self._check_row(row)
            if problem is None:
                good.append(row)
                continue
            if not skip_bad:
                raise problem
            self.initial_bad.append((problem.path, problem.kind, str(problem)))
        if self.initial_bad:
            log.warning("%s: skipping %d bad utterances: %s", self.csv_path, len(self.initial_bad),
                        _summary([(p, k) for p, k, _ in self.initial_bad]))
        if max_utterances > 0:
            good = good[:max_utterances]
        self.rows: List[ManifestRow] = good
        # per-sample skip counters, shared with DataLoader workers (and the kind of the last problem)
        self._skips = torch.zeros(len(good), dtype=torch.int32).share_memory_()
        self._kind = torch.zeros(len(good), dtype=torch.int8).share_memory_()
        self._reported = np.zeros(len(good), dtype=np.int64)  # skip counts already reported (main process)

    def _check_row(self, row: ManifestRow) -> Optional[BadInputError]:
        video = row.video_path(self.root)
        if not row.text.strip():
            return BadInputError(video, f"empty transcript in {self.csv_path}", "empty_transcript")
        if row.frames <= 0:
            return BadInputError(video, f"input_length {row.frames} in {self.csv_path} (no frames)", "no_frames")
        for path, kind in ((video, "video"), (row.audio_path(self.root), "audio")):
            try:
                st = path.stat()
            except FileNotFoundError:
                return BadInputError(path, f"{kind} file is missing", "missing")
            if st.st_size == 0:
                return BadInputError(path, f"{kind} file is empty (0 bytes)", "empty_file")
        return None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> List[int]:
        """Video frames per utterance (from the label CSV), for batching."""
        return [r.frames for r in self.rows]

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(frames uint8 [T, H, W], audio float32 [T * 640]) of an utterance, checked; raises BadInputError."""
        row = self.rows[index]
        vpath = row.video_path(self.root)
        frames = read_video(vpath)
        if abs(len(frames) - row.frames) > 1:
            raise BadInputError(vpath, f"video has {len(frames)} frames but {self.csv_path} says {row.frames} "
                                       "(truncated or wrong file)", "truncated")
        c = self.video_transform.crop
        if frames.shape[1] < c or frames.shape[2] < c:
            raise BadInputError(vpath, f"frames are {frames.shape[1]}x{frames.shape[2]}, smaller than the "
                                       f"{c}x{c} crop", "too_small")
        apath = row.audio_path(self.root)
        audio, _ = align_audio(read_audio(apath, self.sample_rate), len(frames), apath, SAMPLES_PER_FRAME)
        return frames, audio

    def __getitem__(self, index: int) -> Optional[Dict]:
        row = self.rows[index]
        try:
            frames, audio = self.load(index)
        except BadInputError as exc:
            if not self.skip_bad:
                raise
            self._kind[index] = BAD_KINDS.index(exc.kind)
            self._skips[index] += 1  # one writer per index at a time (a sample is in one batch)
            log.warning("skipping bad input: %s", exc)
            return None
        if self.audio_transform.train or self.video_transform.train:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))  # follows torch's (worker) seed
        else:
            rng = np.random.default_rng([self.seed, index])
        return {
            "id": row.utt_id,
            "text": row.text,
            "audio": self.audio_transform(audio, row.utt_id, rng),
            "video": self.video_transform(frames, rng),
        }

    # ---- bad-input bookkeeping -----------------------------------------------------------------------------

    def known_bad(self) -> np.ndarray:
        """Indices found bad so far."""
        return np.flatnonzero(self._skips.numpy())

    def _describe(self, index: int) -> Tuple[str, str]:
        """(file, kind) of a sample a worker found bad, re-checked here for the exact file (audio or video)."""
        try:
            self.load(index)
        except BadInputError as exc:
            return exc.path, exc.kind
        return str(self.rows[index].video_path(self.root)), BAD_KINDS[int(self._kind[index])]

    def end_epoch(self) -> List[Tuple[str, str]]:
        """Log and return (path, kind) of the samples skipped since the last report."""
        skips = self._skips.numpy().astype(np.int64)
        new = np.flatnonzero(skips > self._reported)
        self._reported[:] = skips
        items = [self._describe(int(i)) for i in new]
        if items:
            total = int((skips > 0).sum()) + len(self.initial_bad)
            log.warning("%s: skipped %d bad utterances this epoch (%d different ones so far, %d more left out at "
                        "start): %s",
                        self.csv_path, len(items), total - len(self.initial_bad), len(self.initial_bad),
                        _summary(items))
        return items

    def set_epoch(self, epoch: int) -> None:
        """Called by Accelerate at the start of every epoch: reports what the previous epoch skipped and tells the
        audio transform the epoch (clean-first noise schedule)."""
        self.end_epoch()
        self.audio_transform.epoch = int(epoch)

    def bad_count(self) -> int:
        """Distinct utterances found bad so far (at construction or when read)."""
        return int((self._skips.numpy() > 0).sum()) + len(self.initial_bad)


def _summary(items: Sequence[Tuple[str, str]], limit: int = 5) -> str:
    counts = Counter(k for _, k in items)
    head = ", ".join(f"{k} x{n}" for k, n in counts.most_common())
    examples = "; ".join(f"{p} ({k})" for p, k in items[:limit])
    more = f"; ... {len(items) - limit} more" if len(items) > limit else ""
    return f"{head} -- {examples}{more}"


def report_bad(loader_or_dataset) -> List[Tuple[str, str]]:
    """Report (log) the samples skipped since the last report; returns (path, kind) pairs."""
    ds = getattr(loader_or_dataset, "dataset", loader_or_dataset)
    return ds.end_epoch() if hasattr(ds, "end_epoch") else []


# --------------------------------------------------------------------------------------------------------------
# batching


class LengthBucketBatchSampler:
    """Batches of utterances of similar length whose padded size ``B * T_max`` stays within ``max_frames``.

    Training (``shuffle``): lengths are split into ``num_buckets`` quantile buckets; each epoch the utterances are
    shuffled within their bucket, laid out bucket after bucket, packed greedily, and the batch order is shuffled.
    The plan depends only on ``(seed, epoch)``, so every process of a distributed run sees the same batches. The epoch advances by itself at
    every pass (``set_epoch`` sets it). Evaluation: sorted by length, packed, in order. An utterance longer than
    ``max_frames`` forms a batch on its own. Indices from ``exclude()`` are left out (every process of a
    distributed run must exclude the same ones, or their plans diverge)."""

    def __init__(self, lengths: Sequence[int], max_frames: int, max_batch_size: int = 0, shuffle: bool = False,
                 num_buckets: int = 50, seed: int = 0, exclude=None):
        if max_frames <= 0:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_frames, self.max_batch_size = int(max_frames), int(max_batch_size)
        self.shuffle, self.seed = shuffle, int(seed)
        self.exclude = exclude
        self.epoch = 0
        self._plan_cache: Optional[Tuple[int, int, List[List[int]]]] = None
        n_b = max(1, min(int(num_buckets), len(self.lengths))) if len(self.lengths) else 1
        order = np.argsort(self.lengths, kind="stable")
        self.bucket_of = np.empty(len(self.lengths), dtype=np.int64)
        self.bucket_of[order] = (np.arange(len(order)) * n_b) // max(len(order), 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _pack(self, indices: Sequence[int]) -> List[List[int]]:
        batches: List[List[int]] = []
        cur: List[int] = []
        longest = 0
        for i in indices:
            n = int(self.lengths[i])
            new_longest = max(longest, n)
            full = self.max_batch_size and len(cur) >= self.max_batch_size
            if cur and (full or new_longest * (len(cur) + 1) > self.max_frames):
                batches.append(cur)
                cur, new_longest = [], n
            cur.append(int(i))
            longest = new_longest
        if cur:
            batches.append(cur)
        return batches

    def plan(self, epoch: int) -> List[List[int]]:
        skip = set(int(i) for i in self.exclude()) if self.exclude is not None else set()
        key = (epoch, len(skip))
        if self._plan_cache is not None and self._plan_cache[:2] == key:
            return self._plan_cache[2]
        keep = np.array([i for i in range(len(self.lengths)) if i not in skip], dtype=np.int64)
        if not self.shuffle:
            batches = self._pack(keep[np.argsort(self.lengths[keep], kind="stable")])
        else:
            rng = np.random.default_rng([self.seed, epoch])
            # random order inside each bucket, buckets in length order, packed, then the batches shuffled
            members = keep[rng.permutation(len(keep))]
            members = members[np.argsort(self.bucket_of[members], kind="stable")]
            batches = self._pack(members)
            batches = [batches[k] for k in rng.permutation(len(batches))]
        self._plan_cache = (epoch, len(skip), batches)
        return batches

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        yield from self.plan(epoch)

    def __len__(self) -> int:
        return len(self.plan(self.epoch))


def collate_batch(samples: Sequence[Optional[Dict]]) -> Optional[Dict]:
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    B = len(samples)
    a_len = torch.tensor([s["audio"].shape[0] for s in samples], dtype=torch.long)
    v_len = torch.tensor([s["video"].shape[0] for s in samples], dtype=torch.long)
    _, C, H, W = samples[0]["video"].shape
    audio = torch.zeros(B, int(a_len.max()), dtype=torch.float32)
    video = torch.zeros(B, int(v_len.max()), C, H, W, dtype=torch.float32)
    for k, s in enumerate(samples):
        audio[k, : a_len[k]] = s["audio"]
        video[k, : v_len[k]] = s["video"]
    return {"ids": [s["id"] for s in samples], "text": [s["text"] for s in samples], "audio": audio,
            "audio_lengths": a_len, "video": video, "video_lengths": v_len}


class AVDataLoader(DataLoader):
    """A DataLoader that drops all-bad (None) batches and reports skipped samples when an epoch ends."""

    def __iter__(self):
        for batch in super().__iter__():
            if batch is not None:
                yield batch
        report_bad(self.dataset)


# --------------------------------------------------------------------------------------------------------------
# from a config


def _csv_for(cfg, root: Path, split: str) -> Path:
    names = {"train": cfg.data.train_csv, "val": cfg.data.val_csv, "test": cfg.data.test_csv}
    if split not in names:
        raise ValueError(f"unknown split {split!r}; choose train, val or test")
    p = Path(names[split]).expanduser()
    return p if p.is_absolute() else root / p


def build_dataset(cfg, split: str, train: Optional[bool] = None, snr=None, noise_type: Optional[str] = None,
                  max_utterances: int = 0) -> AVDataset:
    """The dataset of ``split`` (train/val/test). ``train`` (default: split == "train") picks the train or eval
    transforms; ``snr`` (dB; None = clean in evaluation, the ``train_snrs`` list in training) fixes the SNR of the
    added noise of ``noise_type`` (default data.noise.type).
    For data.dataset=synth the corpus is generated on first use."""
    from mome.data.noise import build_noise_source
    from mome.data.synth import ensure_corpus

    train = (split == "train") if train is None else bool(train)
    snr = parse_snr(snr) if snr is not None else None
    root = ensure_corpus(cfg)
    tcfg = cfg.data.transforms
    needs_noise = snr is not None or (train and any(parse_snr(s) is not None for s in tcfg.train_snrs))
    noise = build_noise_source(cfg, noise_type) if needs_noise else None
    return AVDataset(
        root, _csv_for(cfg, root, split),
        video_transform=VideoTransform(tcfg, train),
        audio_transform=AudioTransform(tcfg, train, noise=noise, snr=snr, noise_seed=cfg.data.noise.seed),
        skip_bad=cfg.data.skip_bad,
        # only training drops long utterances: validation and test WER cover every utterance of their split
        max_frames=int(round(cfg.data.max_duration_s * cfg.data.fps)) if split == "train" else 0,
        max_utterances=max_utterances, fps=cfg.data.fps, sample_rate=cfg.data.sample_rate, seed=cfg.train.seed,
    )


def build_dataloader(cfg, split: str, train: Optional[bool] = None, snr=None, noise_type: Optional[str] = None,
                     max_utterances: int = 0) -> AVDataLoader:
    """Length-bucketed batches of ``split`` (see ``build_dataset`` for the arguments): ``data.max_frames`` padded
    frames per batch in training, ``data.max_frames_eval`` otherwise; shuffled only in training."""
    train = (split == "train") if train is None else bool(train)
    ds = build_dataset(cfg, split, train=train, snr=snr, noise_type=noise_type, max_utterances=max_utterances)
    sampler = LengthBucketBatchSampler(
        ds.lengths, cfg.data.max_frames if train else cfg.data.max_frames_eval,
        max_batch_size=cfg.data.max_batch_size, shuffle=train, num_buckets=cfg.data.num_buckets,
        seed=cfg.train.seed)
    workers = int(cfg.data.num_workers)
    return AVDataLoader(ds, batch_sampler=sampler, collate_fn=collate_batch, num_workers=workers,
                        persistent_workers=False, pin_memory=False)
