"""Mouth regions of interest from facial landmarks: the 96x96, 25 fps grey crops the LRS2/LRS3 loaders read.

The crop follows the head, from the landmarks that do not move when one speaks (``STABLE``: the eye corners and
the base of the nose): in every frame their centroid, their spread (RMS distance to the centroid) and the angle of
the line through the outer eye corners give where the head is, how large and how tilted. Where the mouth sits in
that head frame, and how far it is from the eyes, is the median over the clip, so the crop does not jump with
the jaw or with the mouth landmarks' own noise, and the lips move inside it. The crop is turned so that the eyes are
level and scaled so that the eyes-to-mouth distance is ``EYE_MOUTH_PX`` pixels of it (a 96-pixel crop then spans
about 1.4 times that distance: lips, the corners of the mouth, part of the nose and the chin, as in the LRS3 ROIs).

Frames where no face was found are filled by linear interpolation between their neighbours (held at the ends),
when the gap is at most ``max_gap`` frames; a longer gap, or no face at all, raises ``NoFaceError`` naming the file
and the frame range. Landmarks are then averaged over a centred window of ``2 * smooth + 1`` frames (shrinking at
the ends), which keeps the crop steady and follows steady motion exactly.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from mome.data.face import LEFT_EYE, MOUTH, RIGHT_EYE

ROI_SIZE = 96
EYE_MOUTH_PX = 70.0
STABLE = [33, 36, 39, 42, 45]  # nose base, eye corners (68-point indices)
OUTER_EYE_CORNERS = (36, 45)


def is_mouth_roi(frames: np.ndarray) -> bool:
    """Frames [T, H, W] that are already ``ROI_SIZE`` square are taken for a mouth crop (the synthetic corpus, the
    LRS ROIs of auto_avsr): they need no face detection."""
    return tuple(frames.shape[1:3]) == (ROI_SIZE, ROI_SIZE)


class NoFaceError(ValueError):
    """No face (or none for too long) in a clip; the message names the file and the frames."""


def _ranges(missing: np.ndarray) -> List[Tuple[int, int]]:
    """Inclusive (first, last) index ranges of the True runs."""
    out, start = [], None
    for i, m in enumerate(list(missing) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i - 1))
            start = None
    return out


def fill_gaps(landmarks: Sequence[Optional[np.ndarray]], path, fps: float = 25.0, max_gap: int = 25) -> np.ndarray:
    """[T, 68, 2] from per-frame landmarks with None where no face was found (see the module docstring)."""
    T = len(landmarks)
    missing = np.array([p is None for p in landmarks])
    if T == 0 or missing.all():
        raise NoFaceError(f"{path}: no face found in any of its {T} frames (frames 0-{max(T - 1, 0)}); the clip needs "
                          f"a visible, roughly frontal face (or pass --roi if it is already a mouth crop)")
    for a, b in _ranges(missing):
        if b - a + 1 > max_gap:
            raise NoFaceError(f"{path}: no face found in frames {a}-{b} ({a / fps:.2f}-{(b + 1) / fps:.2f} s, "
                              f"{b - a + 1} frames; at most {max_gap} are interpolated)")
    known = np.flatnonzero(~missing)
    pts = np.stack([landmarks[i] for i in known]).astype(np.float64)
    out = np.empty((T, *pts.shape[1:]), np.float64)
    flat = pts.reshape(len(known), -1)
    for j in range(flat.shape[1]):  # np.interp holds the end values
        out.reshape(T, -1)[:, j] = np.interp(np.arange(T), known, flat[:, j])
    return out.astype(np.float32)


def smooth_landmarks(landmarks: np.ndarray, radius: int = 6) -> np.ndarray:
    """Centred moving average over ``2 * radius + 1`` frames, the window shrunk symmetrically at the ends."""
    T = len(landmarks)
    c = np.concatenate([np.zeros((1, *landmarks.shape[1:])), np.cumsum(landmarks.astype(np.float64), axis=0)])
    out = np.empty(landmarks.shape, np.float64)
    for t in range(T):
        r = min(radius, t, T - 1 - t)
        out[t] = (c[t + r + 1] - c[t - r]) / (2 * r + 1)
    return out.astype(np.float32)


def crop_params(landmarks: np.ndarray, eye_mouth_px: float = EYE_MOUTH_PX):
    """Per frame of landmarks [T, 68, 2]: (centres [T, 2], angles [T] in radians, scales [T] in crop pixels per frame
    pixel) of the mouth crops (see the module docstring)."""
    pts = np.asarray(landmarks, np.float64)
    stable = pts[:, STABLE]
    centroid = stable.mean(1)
    spread = np.sqrt(((stable - centroid[:, None]) ** 2).sum(-1).mean(1))
    if np.any(spread < 1.0):
        raise ValueError(f"degenerate landmarks (eye corners and nose {spread.min():.2f} px apart)")
    d = pts[:, OUTER_EYE_CORNERS[1]] - pts[:, OUTER_EYE_CORNERS[0]]
    angles = np.arctan2(d[:, 1], d[:, 0])
    cos, sin = np.cos(angles), np.sin(angles)
    mouth = pts[:, MOUTH].mean(1)
    eyes = (pts[:, RIGHT_EYE].mean(1) + pts[:, LEFT_EYE].mean(1)) / 2
    rel = (mouth - centroid) / spread[:, None]  # the mouth in the head frame: unrotated, in units of the spread
    head_x, head_y = np.median(cos * rel[:, 0] + sin * rel[:, 1]), np.median(-sin * rel[:, 0] + cos * rel[:, 1])
    eye_mouth = np.median(np.linalg.norm(mouth - eyes, axis=1) / spread)
    centres = centroid + spread[:, None] * np.stack([cos * head_x - sin * head_y, sin * head_x + cos * head_y], 1)
    return centres, angles, eye_mouth_px / (eye_mouth * spread)


def crop_frame(frame: np.ndarray, centre, angle: float, scale: float, size: int = ROI_SIZE) -> np.ndarray:
    """The ``size`` x ``size`` uint8 crop of a grey frame: centred on ``centre``, turned by ``angle``, ``scale``
    crop pixels per frame pixel (box-reduced first when shrinking more than 2x, then bilinear)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(frame, np.uint8))
    cx, cy = centre
    k = int(1.0 / scale) if scale < 0.5 else 1
    if k > 1:  # average k x k blocks first: bilinear alone would alias
        img = img.reduce(k)
        cx, cy, scale = (cx - (k - 1) / 2) / k, (cy - (k - 1) / 2) / k, scale * k
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    h = (size - 1) / 2.0
    # output (u, v) -> input (a u + b v + c, d u + e v + f)
    data = (cos, -sin, cx - cos * h + sin * h, sin, cos, cy - sin * h - cos * h)
    return np.asarray(img.transform((size, size), Image.AFFINE, data, resample=Image.BILINEAR))


def crop_mouths(frames: np.ndarray, landmarks: np.ndarray, size: int = ROI_SIZE, smooth: int = 6) -> np.ndarray:
    """uint8 [T, size, size] mouth crops of grey frames [T, H, W] from filled landmarks [T, 68, 2]."""
    pts = smooth_landmarks(landmarks, smooth) if smooth > 0 else landmarks
    centres, angles, scales = crop_params(pts)
    out = np.empty((len(frames), size, size), np.uint8)
    for t, frame in enumerate(frames):
        out[t] = crop_frame(frame, centres[t], float(angles[t]), float(scales[t]), size)
    return out


def mouth_rois(frames: np.ndarray, landmarker, path, fps: float = 25.0, max_gap: int = 25, size: int = ROI_SIZE,
               smooth: int = 6) -> Tuple[np.ndarray, np.ndarray, int]:
    """Detect, fill, smooth and crop: (rois uint8 [T, size, size], landmarks [T, 68, 2], frames with a face)."""
    found = [landmarker(f) for f in frames]
    pts = fill_gaps(found, path, fps=fps, max_gap=max_gap)
    return crop_mouths(frames, pts, size=size, smooth=smooth), pts, sum(p is not None for p in found)
