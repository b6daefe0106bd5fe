"""Face and facial-landmark detection on video frames, offline: dlib's HOG face detector and its 68-point shape
predictor (the iBUG 300-W model), both shipped inside PyPI wheels (``dlib-bin``, ``face-recognition-models``).

This is the detector pair AV-HuBERT's LRS3 preprocessing used for its mouth ROIs (there with dlib's CNN face
detector; ``FaceLandmarker(detector="cnn")`` picks that one, about 70 times slower on a CPU). Nothing is downloaded.

    landmarker = FaceLandmarker()
    points = landmarker(gray_frame)   # float32 [68, 2] (x, y) in pixels of the frame, or None without a face

The largest face in the frame wins. Detection runs on a copy whose longer side is at most ``detect_side`` pixels
(faces under about 80 pixels there are found with one 2x upsampling pass); the landmarks come from the full frame.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np

MODELS_PACKAGE = "face_recognition_models"
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"

# 68-point indices (iBUG 300-W)
RIGHT_EYE = slice(36, 42)  # the subject's right eye: left in the image
LEFT_EYE = slice(42, 48)
MOUTH = slice(48, 68)


class FaceModelsMissing(RuntimeError):
    """The detector packages are not installed; the message says which pip package to install."""


def model_file(name: str) -> Path:
    """Path of a model file shipped by ``face-recognition-models`` (found without importing the package, whose
    ``__init__`` needs the removed ``pkg_resources``)."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelsMissing("face detection needs the model files of the pip package 'face-recognition-models' "
                                "(pip install face-recognition-models)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise FaceModelsMissing(f"{path}: model file missing from the installed face-recognition-models; reinstall it")
    return path


def _dlib():
    try:
        import dlib
    except ImportError:
        raise FaceModelsMissing("face detection needs dlib (pip install dlib-bin)") from None
    return dlib


class FaceLandmarker:
    """68 facial landmarks of the largest face in a uint8 grey (or RGB) frame; see the module docstring."""

    def __init__(self, detector: str = "hog", detect_side: int = 640):
        if detector not in ("hog", "cnn"):
            raise ValueError(f"unknown face detector '{detector}'; choose hog or cnn")
        dlib = _dlib()
        self._dlib = dlib
        self.detector_name = detector
        self.detect_side = int(detect_side)
        self._predictor = dlib.shape_predictor(str(model_file(PREDICTOR_FILE)))
        if detector == "hog":
            self._detector = dlib.get_frontal_face_detector()
        else:
            self._detector = dlib.cnn_face_detection_model_v1(str(model_file(CNN_DETECTOR_FILE)))

    def _faces(self, image: np.ndarray):
        for upsample in (0, 1):
            found = self._detector(image, upsample)
            rects = [getattr(d, "rect", d) for d in found]  # the CNN detector gives (rect, confidence)
            if rects:
                return rects
        return []

    def __call__(self, frame: np.ndarray) -> Optional[np.ndarray]:
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        h, w = frame.shape[:2]
        f = min(1.0, self.detect_side / max(h, w))
        small = frame
        if f < 1.0:
            from PIL import Image

            small = np.asarray(Image.fromarray(frame).resize((max(1, round(w * f)), max(1, round(h * f))),
                                                             Image.BILINEAR))
        rects = self._faces(small)
        if not rects:
            return None
        r = max(rects, key=lambda r: r.width() * r.height())
        full = self._dlib.rectangle(int(r.left() / f), int(r.top() / f), int(r.right() / f), int(r.bottom() / f))
        shape = self._predictor(frame, full)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
