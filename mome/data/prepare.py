"""Turn your own videos, or LRS2 / LRS3 as released, into the auto_avsr layout the loader reads.

    python -m mome.data.prepare SRC OUT                      # a folder of clips with a transcript beside each
    python -m mome.data.prepare SRC OUT --csv clips.csv      # or a CSV of path,text[,split]
    python -m mome.data.prepare /data/LRS3 /data/lrs3_mome   # LRS3: trainval/ pretrain/ test/ (the .txt beside)
    python -m mome.data.prepare /data/LRS2 /data/lrs2_mome   # LRS2: main/ + train.txt val.txt test.txt

Then train with ``data.dataset=lrs data.root=OUT`` (the label CSVs are ``OUT/train.csv``, ``val.csv`` and
``test.csv``, the loader's defaults).

What it writes, per clip: ``OUT/<dataset>/<rel_path>.mp4`` (the 96x96 grey mouth crop at 25 fps, found as
``python -m mome.transcribe`` finds it: ``mome.data.clip``, ``mome.data.face``, ``mome.data.mouth``; a clip that
is already 96x96 is kept as the crop) and the ``.wav`` beside it (16 kHz mono, cut or padded to 640 samples per
frame); per split a label CSV with rows ``dataset,rel_path,frames,words,text`` (``mome.data.manifest``), the
transcript lowercased with its whitespace collapsed.

Transcripts: ``clip.txt`` beside ``clip.mp4`` (LRS's ``Text:  ...`` first line is understood; for other files the
whole file is the transcript), or the CSV's ``text`` column. Splits: LRS3 ``trainval`` -> train, ``test`` -> test
(``pretrain`` with ``--pretrain``), and a validation slice of ``--val-fraction`` of the training speakers; LRS2 its
``train/val/test.txt`` lists (``pretrain`` with ``--pretrain``); a folder with ``train/ val/ test/``
sub-folders uses them; otherwise (or a CSV without a ``split`` column) a hash of the clip's path puts
``--val-fraction`` and ``--test-fraction`` of the clips in val and test, the same on every run.

Clips go through ``--workers`` processes with a progress bar. Every finished clip is recorded in
``OUT/prepare_log.jsonl``; a second run skips what is recorded (``--retry-skipped`` tries the skipped ones again),
so an interrupted preparation resumes. Clips that cannot be used (no transcript, undecodable, no audio, no face,
audio much shorter than the video) are skipped and listed, with the reason, in ``OUT/skipped.csv``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg")
SPLITS = ("train", "val", "test")
LOG = "prepare_log.jsonl"


class PrepareError(ValueError):
    """The source cannot be prepared at all (no clips, a malformed CSV); the message names the file."""


@dataclass
class Item:
    src: str  # the clip's path
    rel: str  # its path under OUT/<dataset>/, without extension
    split: str
    text: Optional[str]  # None: no transcript found


# ----------------------------------------------------------------------------------------------------------------
# finding clips and transcripts


def read_transcript(path: Path) -> Optional[str]:
    """A transcript file's text: LRS's ``Text:  ...`` line when there is one, else the whole file; None if missing."""
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if line.startswith("Text:"):
            return line[len("Text:"):].strip()
    return text.strip()


def clean_text(text: Optional[str]) -> str:
    return " ".join((text or "").lower().split())


def _hash_split(rel: str, val_fraction: float, test_fraction: float) -> str:
    u = int(hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _videos(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file())


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def detect_layout(src: Path) -> str:
    """``lrs3``, ``lrs2``, ``splits`` (train/val/test sub-folders) or ``folder``."""
    if (src / "main").is_dir() and any((src / f"{s}.txt").is_file() for s in SPLITS):
        return "lrs2"
    if (src / "trainval").is_dir() or ((src / "pretrain").is_dir() and (src / "test").is_dir()):
        return "lrs3"
    if any((src / s).is_dir() for s in SPLITS):
        return "splits"
    return "folder"


def find_items(src: Path, csv_path: Optional[Path] = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
               pretrain: bool = False) -> Tuple[str, List[Item]]:
    """(layout, clips with their split and transcript)."""
    if csv_path is not None:
        return "csv", _csv_items(csv_path, src, val_fraction, test_fraction)
    layout = detect_layout(src)
    items: List[Item] = []
    if layout == "lrs2":
        for split in SPLITS:
            lst = src / f"{split}.txt"
            if not lst.is_file():
                continue
            for line in lst.read_text().splitlines():
                if not line.strip():
                    continue
                rel = "main/" + line.split()[0]  # test.txt lines may carry a flag after the id
                clip = src / (rel + ".mp4")
                items.append(Item(str(clip), rel, split, read_transcript(clip.with_suffix(".txt"))))
        if pretrain and (src / "pretrain").is_dir():
            items += [Item(str(p), _rel(p, src), "train", read_transcript(p.with_suffix(".txt")))
                      for p in _videos(src / "pretrain")]
    elif layout == "lrs3":
        folders = [("trainval", "train"), ("test", "test")] + ([("pretrain", "train")] if pretrain else [])
        for folder, split in folders:
            if not (src / folder).is_dir():
                continue
            for p in _videos(src / folder):
                rel = _rel(p, src)
                if split == "train" and folder == "trainval":  # a validation slice, whole speakers
                    split_ = "val" if _hash_split(p.parent.name, val_fraction, 0.0) == "val" else "train"
                else:
                    split_ = split
                items.append(Item(str(p), rel, split_, read_transcript(p.with_suffix(".txt"))))
    elif layout == "splits":
        for split in SPLITS:
            if (src / split).is_dir():
                items += [Item(str(p), _rel(p, src), split, read_transcript(p.with_suffix(".txt")))
                          for p in _videos(src / split)]
    else:
        items = [Item(str(p), _rel(p, src), _hash_split(_rel(p, src), val_fraction, test_fraction),
                      read_transcript(p.with_suffix(".txt"))) for p in _videos(src)]
    if not items:
        raise PrepareError(f"{src}: no video clips found (looked for {', '.join(VIDEO_EXTS)}; layout '{layout}')")
    return layout, items


def _csv_items(csv_path: Path, src: Path, val_fraction: float, test_fraction: float) -> List[Item]:
    if not csv_path.is_file():
        raise PrepareError(f"{csv_path}: CSV file not found")
    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "text"} <= set(rows[0]):
        raise PrepareError(f"{csv_path}: needs a header with the columns path,text (and optionally split)")
    items = []
    for lineno, r in enumerate(rows, start=2):
        p = Path(r["path"]).expanduser()
        p = p if p.is_absolute() else src / p
        try:
            rel = _rel(p, src)
        except ValueError:
            rel = Path(r["path"]).with_suffix("").name  # a clip outside SRC: its name
        split = (r.get("split") or "").strip() or _hash_split(rel, val_fraction, test_fraction)
        if split not in SPLITS:
            raise PrepareError(f"{csv_path}:{lineno}: split '{split}'; choose one of {', '.join(SPLITS)}")
        items.append(Item(str(p), rel, split, r["text"]))
    return items


# ----------------------------------------------------------------------------------------------------------------
# one clip (in a worker process)

_LANDMARKER = None


def _landmarker(detector: str):
    global _LANDMARKER
    if _LANDMARKER is None:
        from mome.data.face import FaceLandmarker

        _LANDMARKER = FaceLandmarker(detector)
    return _LANDMARKER


def prepare_item(item: Item, out_dir: str, dataset: str, detector: str = "hog") -> Dict:
    """Write one clip's mouth crop and wav; returns the log record (status ``ok`` with the CSV row, or
    ``skipped`` with the reason)."""
    from mome.data.clip import read_clip
    from mome.data.media import SAMPLE_RATE, BadInputError, align_audio, write_video, write_wav
    from mome.data.mouth import NoFaceError, is_mouth_roi, mouth_rois

    rec = {"src": item.src, "rel": item.rel, "split": item.split}
    text = clean_text(item.text)
    if item.text is None:
        return {**rec, "status": "skipped", "reason": "no transcript (no .txt beside the clip)"}
    if not text:
        return {**rec, "status": "skipped", "reason": "empty transcript"}
    try:
        clip = read_clip(item.src)
        if clip.frames is None:
            raise BadInputError(item.src, "no video stream", "no_frames")
        if clip.audio is None:
            raise BadInputError(item.src, "no audio (no soundtrack and no .wav beside it)", "short_audio")
        frames = clip.frames if is_mouth_roi(clip.frames) else mouth_rois(clip.frames, _landmarker(detector),
                                                                        item.src)[0]
        audio, _ = align_audio(clip.audio, len(frames), item.src)
    except (BadInputError, NoFaceError) as exc:
        return {**rec, "status": "skipped", "reason": str(exc).replace(f"{item.src}: ", "", 1)}
    video = Path(out_dir) / dataset / (item.rel + ".mp4")
    video.parent.mkdir(parents=True, exist_ok=True)
    write_video(video, frames)
    write_wav(video.with_suffix(".wav"), audio, SAMPLE_RATE)
    return {**rec, "status": "ok", "frames": int(len(frames)), "text": text}


# ----------------------------------------------------------------------------------------------------------------
# the whole source


def read_log(path: Path) -> Dict[str, Dict]:
    """Records of a previous run by source path (a torn last line from an interrupted run is ignored)."""
    done: Dict[str, Dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["src"]] = rec
    return done


def write_outputs(out: Path, dataset: str, records: Iterable[Dict]) -> Dict[str, int]:
    """The label CSVs and ``skipped.csv`` from the records; returns utterances per split."""
    from mome.data.manifest import ManifestRow, write_manifest

    records = sorted(records, key=lambda r: r["rel"])
    counts = {}
    for split in SPLITS:
        rows = [ManifestRow(dataset, r["rel"] + ".mp4", r["frames"], str(len(r["text"].split())), r["text"])
                for r in records if r["status"] == "ok" and r["split"] == split]
        write_manifest(out / f"{split}.csv", rows)
        counts[split] = len(rows)
    tmp = out / f".skipped.csv.{os.getpid()}.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows([r["src"], r["reason"]] for r in records if r["status"] == "skipped")
    os.replace(tmp, out / "skipped.csv")
    return counts


def prepare(src, out, csv_path=None, dataset: Optional[str] = None, workers: int = 2, val_fraction: float = 0.1,
            test_fraction: float = 0.1, pretrain: bool = False, retry_skipped: bool = False, detector: str = "hog",
            progress: bool = True) -> Dict:
    """Prepare ``src`` into ``out`` (see the module docstring); returns a summary."""
    from tqdm.auto import tqdm

    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise PrepareError(f"{src}: source folder not found")
    layout, items = find_items(src, Path(csv_path) if csv_path else None, val_fraction, test_fraction, pretrain)
    dataset = dataset or (layout if layout in ("lrs2", "lrs3") else src.name)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG
    done = read_log(log_path)

    def finished(rec: Optional[Dict]) -> bool:
        if rec is None or (rec["status"] == "skipped" and retry_skipped):
            return False
        if rec["status"] == "ok":
            v = out / dataset / (rec["rel"] + ".mp4")
            return v.is_file() and v.with_suffix(".wav").is_file()
        return True

    todo = [it for it in items if not finished(done.get(it.src))]
    started = time.perf_counter()
    with log_path.open("a", encoding="utf-8") as log, \
            tqdm(total=len(items), initial=len(items) - len(todo), desc="prepare", unit="clip",
                 disable=not progress) as bar:
        def record(rec: Dict) -> None:
            done[rec["src"]] = rec
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.update(1)

        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(prepare_item, it, str(out), dataset, detector) for it in todo]
                for fut in as_completed(futures):
                    record(fut.result())
        else:
            for it in todo:
                record(prepare_item(it, str(out), dataset, detector))
    wanted = {it.src for it in items}
    records = [r for s, r in done.items() if s in wanted]
    counts = write_outputs(out, dataset, records)
    skipped = [r for r in records if r["status"] == "skipped"]
    return {"layout": layout, "dataset": dataset, "clips": len(items), "processed": len(todo),
            "resumed": len(items) - len(todo), "splits": counts, "skipped": len(skipped),
            "seconds": round(time.perf_counter() - started, 1), "out": str(out)}


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description="Prepare clips (or LRS2/LRS3) into the auto_avsr layout for training.")
    p.add_argument("src", help="folder of clips (transcript .txt beside each), or LRS2 / LRS3 as released")
    p.add_argument("out", help="output root (then: data.dataset=lrs data.root=OUT)")
    p.add_argument("--csv", default=None, help="CSV with columns path,text[,split] (paths relative to SRC)")
    p.add_argument("--dataset", default=None, help="dataset name (first CSV column; default lrs2/lrs3 or SRC's name)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2))))
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--pretrain", action="store_true", help="LRS2/LRS3: also prepare the pretrain folder (as train)")
    p.add_argument("--retry-skipped", action="store_true", help="try the clips skipped by an earlier run again")
    p.add_argument("--detector", default="hog", choices=("hog", "cnn"))
    args = p.parse_args(argv)
    try:
        summary = prepare(args.src, args.out, args.csv, args.dataset, args.workers, args.val_fraction,
                          args.test_fraction, args.pretrain, args.retry_skipped, args.detector)
    except PrepareError as exc:
        raise SystemExit(f"prepare: {exc}") from None
    s = summary["splits"]
    print(f"[prepare] {summary['out']}: train {s['train']}, val {s['val']}, test {s['test']} utterances "
          f"({summary['dataset']}, layout {summary['layout']}); {summary['processed']} clips processed, "
          f"{summary['resumed']} from an earlier run, {summary['skipped']} skipped"
          + (f" (listed in {Path(summary['out']) / 'skipped.csv'})" if summary["skipped"] else "")
          + f"; {summary['seconds']} s", file=sys.stderr)
    print(f"[prepare] train with: data.dataset=lrs data.root={summary['out']}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
