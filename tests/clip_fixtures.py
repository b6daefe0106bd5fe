"""Ordinary clips for the transcribe and prepare tests: colour H.264 mp4 (any size and frame rate) with an AAC
soundtrack, and a real face photograph composed into a moving, zooming video.

The photograph is Grace Hopper's portrait that matplotlib ships as sample data (``grace_hopper.jpg``), so nothing
is downloaded.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np


def face_photo() -> np.ndarray:
    """uint8 RGB [600, 512, 3]: a real photograph of a face (matplotlib's sample data)."""
    import matplotlib.cbook as cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return np.asarray(im.convert("RGB"))


def write_clip(path, frames: Optional[np.ndarray], fps=25, audio: Optional[np.ndarray] = None,
               sample_rate: int = 16000) -> Path:
    """An mp4 (or any container PyAV guesses from the name) of uint8 RGB frames [T, H, W, 3] at ``fps`` (a number
    or a Fraction) and/or a mono float waveform, AAC-encoded; either may be None."""
    import av

    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        vs = as_ = None
        if frames is not None:
            vs = container.add_stream("libx264", rate=rate)
            vs.width, vs.height = frames.shape[2], frames.shape[1]
            vs.pix_fmt = "yuv420p"
            vs.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        if audio is not None:
            as_ = container.add_stream("aac", rate=sample_rate)
            as_.layout = "mono"
        if vs is not None:
            for t, img in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img, np.uint8), format="rgb24")
                frame.pts = t
                frame.time_base = 1 / rate
                for packet in vs.encode(frame):
                    container.mux(packet)
            for packet in vs.encode():
                container.mux(packet)
        if as_ is not None:
            samples = np.asarray(audio, np.float32)[None, :]
            step = 1024
            for start in range(0, samples.shape[1], step):
                chunk = np.ascontiguousarray(samples[:, start:start + step])
                frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                for packet in as_.encode(frame):
                    container.mux(packet)
            for packet in as_.encode(None):
                container.mux(packet)
    return path


def paste(canvas: np.ndarray, image: np.ndarray, x: int, y: int, scale: float) -> tuple:
    """Paste ``image`` resized by ``scale`` with its top-left corner at (x, y) into ``canvas`` (in place);
    returns the resized size (w, h)."""
    from PIL import Image

    w, h = int(round(image.shape[1] * scale)), int(round(image.shape[0] * scale))
    small = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    H, W = canvas.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    canvas[y0:y1, x0:x1] = small[y0 - y:y1 - y, x0 - x:x1 - x]
    return w, h


def moving_face_video(num_frames: int, size=(480, 360), start=(40, 10, 0.45), end=(200, 60, 0.55),
                      background=(40, 90, 60)):
    """The face photograph moving from ``start`` to ``end`` (x, y, scale) over ``num_frames`` frames on a plain
    background: (frames uint8 [T, H, W, 3], per-frame (x, y, scale) placements)."""
    photo = face_photo()
    W, H = size
    frames = np.empty((num_frames, H, W, 3), np.uint8)
    places = []
    for t in range(num_frames):
        a = t / max(num_frames - 1, 1)
        x, y, s = (round(p + a * (q - p)) if i < 2 else p + a * (q - p) for i, (p, q) in enumerate(zip(start, end)))
        frames[t] = np.array(background, np.uint8)
        paste(frames[t], photo, int(x), int(y), float(s))
        places.append((int(x), int(y), float(s)))
    return frames, places
