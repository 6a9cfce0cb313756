"""The photo path's settings: :class:`PhotoConfig` (decoding, detectors, alignment,
crop margin; ``--photo-set KEY=VALUE``) and the Haar cascades it names."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import cv2

from ..config import check_range
from ..inputs import MAX_PIXELS
from .decode import PhotoError

Box = tuple[int, int, int, int]  # x, y, width, height in image pixels

# Ranges of the numeric settings: (low, high, low_open, high_open); None = unbounded.
RANGES = {
    "scale_factor": (1, None, True, False),
    "tight_scale_factor": (1, None, True, False),
    "min_neighbors": (0, None, False, False),
    "min_face": (1, None, False, False),
    "max_side": (1, None, False, False),
    "overlap": (0, 1, False, False),
    "tight_max_side": (0, None, False, False),
    "tight_max_aspect": (1, None, False, False),
    "tight_pad": (0, 4, False, False),
    "tight_min_face": (0, None, True, False),  # above 1: the tight-crop search never succeeds
    "whole_pad": (0, 4, False, False),
    "whole_min_face": (0, 1, False, False),
    "margin_scale": (0, 10, True, False),
    "max_pixels": (0, None, False, False),
    "hog_min_face": (1, None, False, False),
    "quick_side": (0, None, False, False),
    "hog_pad": (0, 4, False, False),
    "cnn_max_side": (0, None, False, False),
    "cnn_min_score": (0, 1, False, False),
    "relative_min_score": (0, 1, False, False),
    "margin_shift_x": (-1, 1, False, False),
    "margin_shift_y": (-1, 1, False, False),
}


@dataclass
class PhotoConfig:
    # --- decoding
    max_pixels: int = MAX_PIXELS  # refuse images with more pixels than this (0 = no limit)
    # --- detector: "dlib" (HOG, then CNN on a miss; 5 landmarks for alignment; needs the
    # dlib-bin and face_recognition_models packages) or "haar" (OpenCV cascades, no landmarks)
    detector: str = "dlib"  # falls back to "haar" with a warning when dlib is not installed
    align: bool = True  # dlib: rotate and scale each face from its landmarks (eyes level)
    hog_min_face: int = 40  # dlib: smallest face searched in large images, pixels
    quick_side: int = 100  # dlib: a small image is first searched at this short side
    # (only faces filling most of it, as in a tight face crop: about 10x faster), 0 = off
    hog_pad: float = 0.125  # dlib: a small image with no face is searched again, padded this much
    hog_small_upsample: bool = True  # dlib: ... and upsampled 2x (faces under 80 px)
    rotations: tuple[float, ...] = (30.0, -30.0)  # dlib: angles tried when nothing is found
    cnn_max_side: int = 320  # dlib: last try, the CNN detector on a copy this long (0 = off)
    cnn_min_score: float = 0.3  # dlib: CNN detections below this confidence are dropped
    # dlib: a box scoring under this share of the photo's best face is dropped (a textured
    # patch beside a clear face: the sample photo's mission badge scores 0.025 of the face;
    # on fairface_dev and the shared photos the weakest kept second face scores 0.069)
    relative_min_score: float = 0.05
    # alignment target: eye centres and nose tip as shares of the training crop's side
    # (measured on the shared UTKFace photos: benchmarks/compare_detectors.py, docs/photos.md)
    target_right_eye: tuple[float, ...] = (0.296, 0.300)  # (x, y) of the eye on the image's left
    target_left_eye: tuple[float, ...] = (0.679, 0.302)  # the eye on the image's right
    target_nose: tuple[float, ...] = (0.490, 0.590)  # the base of the nose
    # --- Haar detection (OpenCV Haar cascades shipped in opencv-python, cv2.data.haarcascades)
    cascade: str = "haarcascade_frontalface_alt2.xml"  # precise boxes: used for every crop
    check_cascade: str = "haarcascade_frontalface_default.xml"  # higher recall: whole-image check
    scale_factor: float = 1.1  # pyramid step between searched face sizes
    min_neighbors: int = 3  # overlapping hits needed to accept a face (higher = fewer false faces)
    min_face: int = 24  # smallest face searched, pixels at detection resolution
    max_side: int = 1280  # the general search runs on a copy at most this long (speed)
    overlap: float = 0.5  # drop a face covered over this share by a stronger one
    # --- tight face crops (e.g. 200x200 UTKFace photos): the face touches the borders
    tight_max_side: int = 512  # images up to this long side may be one tight face crop ...
    tight_max_aspect: float = 1.5  # ... if also at most this elongated
    tight_pad: float = 0.25  # border added (replicated), as a share of the short side
    tight_min_face: float = 0.8  # a tight crop's face is at least this share of the short side
    tight_scale_factor: float = 1.2  # coarser pyramid for that one big face (speed)
    whole_pad: float = 0.5  # border for the high-recall check before whole-image fallback
    whole_min_face: float = 0.4  # face size (share of the short side) that makes it face-sized
    # --- crop margin: detected box -> extent of a training face (measured, docs/photos.md)
    margin_scale: float = 0.975  # crop side / box side
    margin_shift_x: float = 0.0  # crop centre right of the box centre, in box widths
    margin_shift_y: float = 0.09  # crop centre below the box centre, in box heights

    def __post_init__(self) -> None:
        for key, (lo, hi, lo_open, hi_open) in RANGES.items():  # ConfigError naming the key
            check_range(self, key, lo, hi, low_open=lo_open, high_open=hi_open)
        if self.detector not in ("dlib", "haar"):
            raise PhotoError(f"unknown detector {self.detector!r}: choose dlib or haar")
        for key in ("target_right_eye", "target_left_eye", "target_nose"):
            v = getattr(self, key)
            if len(v) != 2 or not all(0.0 <= x <= 1.0 for x in v):  # NaN fails too
                raise PhotoError(
                    f"{key} must be two numbers x,y in [0, 1] (shares of the crop), got {v}"
                )
        if not all(-180.0 <= a <= 180.0 for a in self.rotations):
            raise PhotoError(f"rotations must be angles in [-180, 180], got {self.rotations}")

    def check_cascades(self) -> None:
        """Load both Haar cascades: a PhotoError naming a missing one, before any work."""
        for name in (self.cascade, self.check_cascade):
            self.classifier(name)

    def classifier(self, name: str) -> cv2.CascadeClassifier:
        """The cascade ``name``, loaded once per thread (a cascade is not thread-safe)."""
        cache = _CASCADES.__dict__
        if name not in cache:
            folder = cv2.data.haarcascades
            path = os.path.join(folder, name)
            if os.path.basename(name) != name or not name.endswith(".xml"):
                raise PhotoError(f"cascade {name!r} must be a file name ending .xml in {folder}")
            if os.path.isdir(folder) and not os.path.isfile(path):
                known = sorted(f for f in os.listdir(folder) if f.endswith(".xml"))
                if known:
                    raise PhotoError(f"no cascade {name!r} in {folder}; known: {', '.join(known)}")
            clf = cv2.CascadeClassifier(path)
            if clf.empty():
                raise PhotoError(
                    f"face detector {path} is missing: install opencv-python(-headless) 4.x "
                    "(OpenCV 5 no longer bundles the Haar cascades)"
                )
            cache[name] = clf
        return cache[name]


_CASCADES = threading.local()
