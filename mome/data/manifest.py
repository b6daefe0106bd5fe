"""Label CSVs in the auto_avsr / LRS3 layout, one utterance per line::

    dataset_name,rel_path,input_length,token_count_or_unused,text

``rel_path`` is the mouth-ROI mp4 relative to ``<root>/<dataset_name>/``; its audio is the ``.wav`` with the same
stem. ``input_length`` is the number of video frames (25 fps), used for length-bucketed batching. The fourth
column is not used (auto_avsr keeps token ids there; we write the word count). The text is lowercase; it may
contain commas (everything after the fourth comma is the text).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List


class ManifestError(ValueError):
    """A label CSV is malformed; the message names the file and line."""


@dataclass(frozen=True)
class ManifestRow:
    dataset: str
    rel_path: str
    frames: int
    extra: str
    text: str

    @property
    def utt_id(self) -> str:
        stem = self.rel_path.rsplit(".", 1)[0] if "." in Path(self.rel_path).name else self.rel_path
        return f"{self.dataset}/{stem}"

    def video_path(self, root: str | os.PathLike) -> Path:
        return Path(root) / self.dataset / self.rel_path

    def audio_path(self, root: str | os.PathLike) -> Path:
        return self.video_path(root).with_suffix(".wav")

    def to_line(self) -> str:
        if "\n" in self.text or "\r" in self.text:
            raise ManifestError(f"transcript of {self.rel_path} contains a line break")
        return f"{self.dataset},{self.rel_path},{self.frames},{self.extra},{self.text}"


def read_manifest(path: str | os.PathLike) -> List[ManifestRow]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: label CSV not found")
    rows: List[ManifestRow] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split(",", 4)
            if len(parts) < 5:
                raise ManifestError(
                    f"{path}:{lineno}: expected 5 comma-separated columns "
                    f"(dataset_name,rel_path,input_length,unused,text), got {len(parts)}: {line[:120]!r}")
            dataset, rel_path, frames, extra, text = parts
            try:
                n = int(frames)
            except ValueError:
                raise ManifestError(f"{path}:{lineno}: input_length {frames!r} is not an integer frame count") from None
            if not dataset or not rel_path:
                raise ManifestError(f"{path}:{lineno}: empty dataset_name or rel_path")
            rows.append(ManifestRow(dataset.strip(), rel_path.strip(), n, extra.strip(), text.strip()))
    return rows


def write_manifest(path: str | os.PathLike, rows: Iterable[ManifestRow]) -> Path:
    """Write atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(r.to_line() + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path
