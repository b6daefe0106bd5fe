"""Render a 96x96 grayscale mouth-region video from per-frame mouth parameters.

The picture is drawn analytically, all frames at once, in mouth-centred coordinates that follow a small head motion
(translation, roll, scale): skin with a fixed per-speaker texture and lighting, an upper and a lower lip whose
contours follow the lip aperture (the jaw drops the lower lip more than the upper one rises), lip width (spread vs
rounded and protruded), a dark mouth cavity with upper and lower teeth and the tongue, the upper teeth over the
tucked lower lip for f/v, pressed (thinner) lips for p/b/m, and the shadow under the lower lip that moves with the
jaw. Per-frame sensor noise and a slight brightness flicker finish it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import numpy as np
from scipy.ndimage import affine_transform, gaussian_filter

from mome.data.speakers import Appearance
from mome.data.visemes import MouthTrack

SIZE = 96
_TEX = 192  # texture canvas (face coordinates, pixels), centred on the mouth
_EDGE = 0.8  # anti-aliasing width of shape edges, pixels


@lru_cache(maxsize=64)
def _textures(seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(smooth skin texture, fine stubble texture), each zero-mean unit-std [_TEX, _TEX]."""
    rng = np.random.default_rng(seed)
    smooth = gaussian_filter(rng.standard_normal((_TEX, _TEX)), 5.0, mode="wrap")
    smooth += 0.5 * gaussian_filter(rng.standard_normal((_TEX, _TEX)), 1.5, mode="wrap")
    fine = gaussian_filter(rng.standard_normal((_TEX, _TEX)), 0.6, mode="wrap")
    return ((smooth - smooth.mean()) / smooth.std()).astype(np.float32), ((fine - fine.mean()) / fine.std()).astype(np.float32)


def head_motion(num_frames: int, rng: np.random.Generator, fps: int = 25) -> np.ndarray:
    """[T, 4] smooth (dx px, dy px, roll rad, scale) trajectories: sums of slow sinusoids with random phases."""
    t = np.arange(num_frames) / fps
    out = np.zeros((num_frames, 4), np.float64)
    amps = (1.6, 1.1, np.deg2rad(2.0), 0.025)
    for j, amp in enumerate(amps):
        freqs = rng.uniform(0.15, 0.9, size=2)
        phases = rng.uniform(0, 2 * np.pi, size=2)
        weights = rng.uniform(0.3, 1.0, size=2)
        out[:, j] = amp * (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0) / weights.sum()
    out[:, 3] += 1.0
    return out


def _soft(d: np.ndarray) -> np.ndarray:
    """1 inside (d > 0), 0 outside, linear over _EDGE pixels."""
    return np.clip(d * (1.0 / _EDGE) + 0.5, 0.0, 1.0)


@lru_cache(maxsize=64)
def _face_canvas(app: Appearance) -> np.ndarray:
    """The still face (skin, texture, stubble) in mouth-centred coordinates, [SIZE, SIZE] float32."""
    smooth, fine = _textures(app.seed)
    o = (_TEX - SIZE) // 2
    canvas = app.skin + app.texture_amp * smooth[o:o + SIZE, o:o + SIZE]
    if app.stubble > 0:
        v, u = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) - SIZE / 2 + 0.5
        ring = 1.0 - np.exp(-3.0 * ((u / (1.3 * app.mouth_half_width)) ** 2 + (v / 25.0) ** 2))
        canvas = canvas + app.stubble * fine[o:o + SIZE, o:o + SIZE] * ring
    return canvas.astype(np.float32)


def _draw_mouth(track: MouthTrack, app: Appearance, u: np.ndarray, v: np.ndarray, img: np.ndarray) -> None:
    """Draw lips, cavity, teeth, tongue and the shading that follows them onto ``img`` [T, len(v), len(u)] in place.

    ``u`` [W] and ``v`` [H] are the mouth-centred coordinates of the window's columns and rows."""
    col = lambda a: np.asarray(a, np.float32)[:, None, None]  # noqa: E731  [T] -> [T, 1, 1]
    u = u[None, None, :]
    v = v[None, :, None]
    spread, open_ = col(track.spread), col(track.open)
    closure, tuck = col(track.closure), col(track.tuck)
    protrude = np.maximum(-spread, 0.0)
    W = app.mouth_half_width * np.where(spread > 0, 1.0 + 0.15 * spread, 1.0 + 0.3 * spread)
    Wi = W * (0.9 - 0.3 * protrude)
    h = open_ * app.max_open
    h_up, h_dn = 0.3 * h, 0.7 * h
    tu = app.upper_lip * (1.0 + 0.35 * protrude) * (1.0 - 0.3 * closure)
    tl = app.lower_lip * (1.0 + 0.35 * protrude) * (1.0 - 0.3 * closure) * (1.0 - 0.4 * tuck)

    # contours, functions of u only: [T, 1, W]
    au = np.abs(u)
    p = np.sqrt(np.clip(1.0 - (u / W) ** 2, 0.0, 1.0))
    pi = np.sqrt(np.clip(1.0 - (u / Wi) ** 2, 0.0, 1.0))
    bow = 1.0 + 0.18 * np.exp(-(((au - 0.22 * W) / (0.12 * W)) ** 2)) - 0.22 * np.exp(-((u / (0.08 * W)) ** 2))
    y_ui, y_li = -h_up * pi, h_dn * pi
    y_uo = y_ui - tu * bow * np.sqrt(p)
    y_lo = y_li + tl * p ** 0.8

    # shading that follows the face: philtrum groove, shadow under the lower lip (moves with the jaw), chin, corners
    below = h_dn + tl + 4.0
    img -= 7.0 * np.exp(-((u / 2.5) ** 2)) * _soft(y_uo - v) * np.exp(-(((v - y_uo + 6.0) / 6.0) ** 2))
    img -= (16.0 * np.exp(-(((v - below) / 2.5) ** 2))) * np.exp(-((u / (0.8 * W)) ** 2))
    img += (6.0 * np.exp(-(((v - below - 14.0) / 8.0) ** 2))) * np.exp(-((u / (1.2 * W)) ** 2))
    corner_v = np.exp(-((v - 0.5 * (h_dn - h_up)) ** 2) / 6.0)
    img -= 18.0 * corner_v * (np.exp(-((u - W) ** 2) / 6.0) + np.exp(-((u + W) ** 2) / 6.0))

    # lips
    a_lip = _soft(W - au) * _soft(v - y_uo) * _soft(y_lo - v)
    lip = (app.skin - app.lip_delta) - 6.0 * (v < 0) + 12.0 * p * np.exp(
        -(((v - (y_li + 0.45 * tl)) / (0.25 * tl + 0.5)) ** 2))  # lower-lip highlight
    img += a_lip * (lip - img)

    # mouth cavity, teeth, tongue
    a_in = _soft(Wi - au) * _soft(v - y_ui) * _soft(y_li - v) * np.clip(h / 1.5, 0.0, 1.0)
    depth = np.exp(-((u / (0.6 * Wi + 1e-3)) ** 2)) * np.exp(-(((v - 0.5 * (y_li + y_ui)) / (0.5 * h + 1.0)) ** 2))
    img += a_in * (app.interior * (1.0 - 0.4 * depth) - img)
    teeth = col(track.teeth)
    up_h = 1.0 + 3.0 * teeth
    upper_teeth = _soft(0.75 * Wi - au) * _soft(y_ui + up_h - v) * _soft(v - y_ui + 1.0)
    a_teeth = upper_teeth * np.maximum(a_in, tuck * _soft(W * 0.6 - au)) * np.clip(teeth * 1.5, 0.0, 1.0)
    lower_teeth = _soft(0.7 * Wi - au) * _soft(v - (y_li - 2.5 * teeth)) * a_in * np.clip(teeth - 0.3, 0.0, 1.0)
    a_teeth = np.maximum(a_teeth, lower_teeth)
    img += a_teeth * ((app.teeth - 12.0 * (au / (W + 1e-3))) - img)
    tongue = col(track.tongue)
    tv = 0.5 * (y_ui + y_li) + 0.25 * h * (1.0 - tongue)
    a_tongue = np.sqrt(np.clip(1.0 - (u / (0.45 * Wi + 1e-3)) ** 2 - ((v - tv) / (0.3 * h + 1.0)) ** 2, 0.0, 1.0))
    a_tongue *= a_in * np.clip(tongue + 0.25 * open_, 0.0, 1.0)
    img += a_tongue * (app.tongue - img)


def render_mouth(track: MouthTrack, app: Appearance, rng: np.random.Generator, fps: int = 25) -> np.ndarray:
    """uint8 [T, 96, 96] frames for ``track`` (see ``mome.data.visemes.mouth_track``).

    The mouth is drawn upright in face coordinates (only inside its bounding window), then each frame is warped
    into the camera by the head motion; lighting (fixed to the camera), flicker and sensor noise come last."""
    T = len(track)
    if T == 0:
        return np.zeros((0, SIZE, SIZE), np.uint8)
    motion = head_motion(T, rng, fps)
    face = np.repeat(_face_canvas(app)[None], T, axis=0)  # a copy: the cached canvas stays untouched
    c = SIZE / 2
    w_half = int(np.ceil(app.mouth_half_width * 1.15 + 6))
    top = int(np.ceil(0.3 * app.max_open + 1.5 * app.upper_lip + 16))
    bottom = int(np.ceil(0.7 * app.max_open + 1.5 * app.lower_lip + 34))
    r0, r1 = max(0, int(c) - top), min(SIZE, int(c) + bottom)
    c0, c1 = max(0, int(c) - w_half), min(SIZE, int(c) + w_half)
    window = face[:, r0:r1, c0:c1]
    _draw_mouth(track, app, np.arange(c0, c1, dtype=np.float32) + 0.5 - c,
                np.arange(r0, r1, dtype=np.float32) + 0.5 - c, window)
    face[:, r0:r1, c0:c1] = window

    # camera: output pixel (x, y) shows the face point R(-theta) ((x, y) - centre - shift) / scale
    out = np.empty((T, SIZE, SIZE), np.float32)
    theta = motion[:, 2] + np.deg2rad(app.tilt_deg)
    for t in range(T):
        cs, sn, sc = np.cos(theta[t]), np.sin(theta[t]), motion[t, 3]
        # (row, col) of the face canvas = M @ (row, col) of the output + offset
        M = np.array([[cs, -sn], [sn, cs]]) / sc
        centre_out = np.array([app.center_y + motion[t, 1], app.center_x + motion[t, 0]])
        offset = np.array([c, c]) - 0.5 - M @ (centre_out - 0.5)
        affine_transform(face[t], M, offset=offset, output=out[t], order=1, mode="nearest")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    out += (app.light_x * (xx - c) + app.light_y * (yy - c)) / SIZE
    out *= (1.0 + 0.012 * rng.standard_normal(T)).astype(np.float32)[:, None, None]
    out += app.noise_std * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
