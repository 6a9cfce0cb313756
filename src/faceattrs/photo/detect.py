"""Faces in a gray image: dlib (HOG with retries, then its CNN; 5 landmarks per face) or
OpenCV's Haar cascades. :func:`find_faces` picks by ``PhotoConfig.detector``.

dlib's model files come from the face_recognition_models package (nothing downloaded).
Without dlib (or ``detector="haar"``) OpenCV's bundled Haar cascades find the faces
(:func:`detect_faces`), without landmarks.

Haar detection (measured on the 24 shared photos and on composed multi-face images, see
docs/photos.md):

1. an image that may be a tight face crop (near-square, at most ``tight_max_side``
   pixels) is padded and searched for one big face with the precise cascade (alt2):
   the face of a tight crop touches the borders, where a cascade cannot see it; if only
   the higher-recall cascade (default) sees such a big face, the whole image is the face;
2. otherwise every face of at least ``min_face`` pixels is searched in the whole image
   (downscaled to ``max_side`` pixels), with the precise cascade;
3. if a possible tight crop still has no face, the higher-recall cascade looks for a
   smaller face (``whole_min_face``); when it finds one the whole image is taken as the face.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from dataclasses import dataclass

import cv2
import numpy as np

from .config import Box, PhotoConfig
from .decode import PhotoError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- Haar cascades


def detect_faces(gray: np.ndarray, cfg: PhotoConfig | None = None) -> list[tuple[Box, float, str]]:
    """Faces of a uint8 gray image as ``(box, score, kind)``, left to right (see module doc).

    A box is the detector's, so it may reach past the image border (for a face cut by the
    border, or found in the padding of a tight crop); :func:`clip_box` cuts it for display.
    """
    cfg = cfg or PhotoConfig()
    h, w = gray.shape
    short = min(h, w)
    tight = max(h, w) <= cfg.tight_max_side and max(h, w) <= cfg.tight_max_aspect * short
    whole = [((0, 0, w, h), 0.0, "whole")]
    if tight:
        big, step = round(cfg.tight_min_face * short), cfg.tight_scale_factor
        found = _haar(gray, cfg, cfg.cascade, cfg.tight_pad, big, step)
        if found:
            return found
        check = _haar(gray, cfg, cfg.check_cascade, cfg.whole_pad, big, step)
        if check:  # a tight crop's face that only the high-recall cascade sees
            return [(whole[0][0], check[0][1], "whole")]
    scale = min(1.0, cfg.max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = gray if scale == 1.0 else cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    found = _haar(small, cfg, cfg.cascade, 0.0, cfg.min_face)
    if found or not tight:
        return [(tuple(round(v / scale) for v in box), s, k) for box, s, k in found]
    check = _haar(gray, cfg, cfg.check_cascade, cfg.whole_pad, round(cfg.whole_min_face * short))
    return [(whole[0][0], check[0][1], "whole")] if check else []


def _haar(gray, cfg: PhotoConfig, cascade: str, pad: float, min_size: int, step: float = 0.0):
    """One cascade pass on ``gray`` padded by ``pad`` x short side (replicated border),
    faces of at least ``min_size`` pixels, pyramid step ``step`` (default ``scale_factor``).

    Boxes are in ``gray``'s coordinates and may reach past its borders (into the padding).
    """
    h, w = gray.shape
    p = round(pad * min(h, w))
    img = cv2.copyMakeBorder(gray, p, p, p, p, cv2.BORDER_REPLICATE) if p else gray
    min_size = max(1, min_size)
    if min_size > min(img.shape):
        return []
    boxes, _, weights = cfg.classifier(cascade).detectMultiScale3(
        img,
        step or cfg.scale_factor,
        cfg.min_neighbors,
        minSize=(min_size, min_size),
        outputRejectLevels=True,
    )
    found = [
        ((int(x - p), int(y - p), int(bw), int(bh)), float(s))
        for (x, y, bw, bh), s in zip(boxes, np.ravel(weights), strict=True)
        if clip_box((x - p, y - p, bw, bh), (h, w))[2] > 0
    ]
    keep = _suppress(found, cfg.overlap, (h, w))
    return sorted(((b, s, "detected") for b, s in keep), key=lambda f: (f[0][0], f[0][1]))


def clip_box(box: Box, shape: tuple[int, ...]) -> Box:
    """``box`` cut to the image of ``shape`` (a box wholly outside gets width or height 0)."""
    x, y, w, h = box
    x0, y0 = min(max(0, x), shape[1]), min(max(0, y), shape[0])
    x1, y1 = max(x0, min(shape[1], x + w)), max(y0, min(shape[0], y + h))
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


def _suppress(found, overlap: float, shape):
    """Drop boxes that a higher-scoring box covers by more than ``overlap`` of their area."""
    keep = []
    for box, score in sorted(found, key=lambda f: -f[1]):
        x, y, w, h = clip_box(box, shape)
        covered = False
        for kept, _ in keep:
            a, b, kw, kh = clip_box(kept, shape)
            inter = max(0, min(x + w, a + kw) - max(x, a)) * max(0, min(y + h, b + kh) - max(y, b))
            covered |= inter > overlap * w * h
        if not covered:
            keep.append((box, score))
    return keep


# ---------------------------------------------------------------- dlib: detection, landmarks


@dataclass
class Detection:
    """A face found by :func:`find_faces`: ``box`` (x, y, w, h; may leave the image),
    detector ``score``, ``kind`` and dlib's 5 ``landmarks`` (``(5, 2)`` float, photo pixels:
    two corners of the eye on the image's left, two of the other eye, the base of the nose;
    None for the Haar detector)."""

    box: Box
    score: float
    kind: str = "detected"
    landmarks: np.ndarray | None = None


_DLIB = threading.local()
_DLIB_STATE: dict[str, str | None] = {}


def dlib_missing() -> str | None:
    """Why the dlib detector cannot be used (None when it can): a package is not installed."""
    if "why" not in _DLIB_STATE:
        why = None
        if importlib.util.find_spec("dlib") is None:
            why = "the dlib package is not installed (pip install dlib-bin)"
        elif not os.path.isfile(_dlib_model("shape_predictor_5_face_landmarks.dat")):
            why = "face_recognition_models is not installed (pip install face_recognition_models)"
        _DLIB_STATE["why"] = why
    return _DLIB_STATE["why"]


def _dlib_model(name: str) -> str:
    # found without importing the package: its __init__ needs pkg_resources (old setuptools)
    spec = importlib.util.find_spec("face_recognition_models")
    where = spec.submodule_search_locations if spec else None
    return os.path.join(where[0], "models", name) if where else ""


def _dlib(what: str):
    """dlib's models, loaded once per thread: "hog", "shape" (5 landmarks) or "cnn"."""
    cache = _DLIB.__dict__
    if what not in cache:
        import dlib  # optional (the dlib extra), slow to import: only where used

        if what == "hog":
            cache[what] = dlib.get_frontal_face_detector()
        elif what == "shape":
            cache[what] = dlib.shape_predictor(_dlib_model("shape_predictor_5_face_landmarks.dat"))
        else:
            cache[what] = dlib.cnn_face_detection_model_v1(
                _dlib_model("mmod_human_face_detector.dat")
            )
    return cache[what]


def _resized(gray: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return gray
    h, w = gray.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _dlib_pass(gray: np.ndarray, scale: float, pad: float, angle: float, cnn: float = 0.0):
    """One detector pass on ``gray`` resized by ``scale``, padded by ``pad`` x short side,
    turned by ``angle`` degrees (counter-clockwise, about the centre, canvas grown to fit).
    HOG unless ``cnn`` > 0 (then the CNN, keeping faces scoring at least ``cnn``).

    Returns ``(box, score, landmarks)`` in ``gray``'s pixels; the landmarks are found in
    ``gray`` itself, or for a turned pass in the turned copy (where the face is upright)
    and mapped back.
    """
    import dlib  # optional (the dlib extra), slow to import: only where used

    img = _resized(gray, scale)
    h, w = img.shape
    p = round(pad * min(h, w))
    if p:
        img = cv2.copyMakeBorder(img, p, p, p, p, cv2.BORDER_REPLICATE)
    sx, sy = w / gray.shape[1], h / gray.shape[0]  # the scale after rounding the size
    fwd = np.array([[sx, 0, p], [0, sy, p]], np.float64)  # gray -> searched copy
    if angle:
        hh, ww = img.shape
        rot = cv2.getRotationMatrix2D((ww / 2, hh / 2), angle, 1.0)
        c, s_ = abs(rot[0, 0]), abs(rot[0, 1])
        nw, nh = int(np.ceil(ww * c + hh * s_)), int(np.ceil(ww * s_ + hh * c))
        rot[:, 2] += (nw - ww) / 2, (nh - hh) / 2
        img = cv2.warpAffine(
            img, rot, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        fwd = rot @ np.vstack([fwd, [0, 0, 1]])
    back = cv2.invertAffineTransform(fwd)
    if min(img.shape) < 48:  # below both detectors' smallest face (and the CNN's filters)
        return []
    if cnn:
        found = [(d.rect, d.confidence) for d in _dlib("cnn")(img, 0) if d.confidence >= cnn]
    else:
        rects, scores, _ = _dlib("hog").run(img, 0, 0.0)
        found = list(zip(rects, scores, strict=True))
    shape = _dlib("shape")
    out = []
    for r, score in found:
        r = dlib.rectangle(r.left(), r.top(), r.right(), r.bottom())
        if angle:  # landmarks in the turned copy, where the face is upright
            pts = shape(img, r)
            marks = np.array([(p.x, p.y) for p in pts.parts()], np.float64)
            marks = marks @ back[:, :2].T + back[:, 2]
        else:  # landmarks at the photo's own resolution
            (x0, y0), (x1, y1) = (
                np.array([[r.left(), r.top()], [r.right(), r.bottom()]]) @ back[:, :2].T
                + back[:, 2]
            )
            pts = shape(gray, dlib.rectangle(round(x0), round(y0), round(x1), round(y1)))
            marks = np.array([(p.x, p.y) for p in pts.parts()], np.float64)
        corners = np.array(
            [
                (r.left(), r.top()),
                (r.right() + 1, r.top()),
                (r.left(), r.bottom() + 1),
                (r.right() + 1, r.bottom() + 1),
            ],
            np.float64,
        )
        corners = corners @ back[:, :2].T + back[:, 2]
        x0, y0 = corners.min(0)
        x1, y1 = corners.max(0)
        box = (round(x0), round(y0), round(x1 - x0), round(y1 - y0))
        if clip_box(box, gray.shape)[2] > 0:
            out.append((box, float(score), marks))
    return out


def find_faces(gray: np.ndarray, cfg: PhotoConfig | None = None) -> list[Detection]:
    """Every face of a uint8 gray image, left to right, with landmarks where the detector
    gives them (``cfg.detector``; "dlib" falls back to "haar" when dlib is missing).

    dlib: HOG on the image (a small one, long side up to ``tight_max_side``, first shrunk
    to a short side of ``quick_side`` for a face that fills it, then as it is; a
    larger one scaled so that faces of ``hog_min_face`` pixels are searched, long side at
    most ``max_side``); when nothing is found, a small image again padded and upsampled
    2x, then the image turned by each of ``rotations``, then the CNN detector on a copy at
    most ``cnn_max_side`` long. Each step runs only when the ones before found nothing.
    """
    cfg = cfg or PhotoConfig()
    if cfg.detector not in ("dlib", "haar"):
        raise PhotoError(f"unknown detector {cfg.detector!r}: choose dlib or haar")
    why = dlib_missing() if cfg.detector == "dlib" else None
    if why and "warned" not in _DLIB_STATE:
        _DLIB_STATE["warned"] = "yes"
        log.warning("face detector dlib unavailable (%s): using OpenCV's Haar cascades", why)
    if cfg.detector == "haar" or why:
        return [Detection(b, s, k) for b, s, k in detect_faces(gray, cfg)]
    h, w = gray.shape
    long = max(h, w)
    small = long <= cfg.tight_max_side
    scale = 1.0 if small else min(cfg.max_side / long, 80 / max(1, cfg.hog_min_face))
    tries = [(scale, 0.0, 0.0, 0.0)]
    if small and cfg.quick_side and min(h, w) > cfg.quick_side:
        tries.insert(0, (cfg.quick_side / min(h, w), 0.0, 0.0, 0.0))
    if small and (cfg.hog_pad or cfg.hog_small_upsample):
        tries.append((2.0 if cfg.hog_small_upsample else 1.0, cfg.hog_pad, 0.0, 0.0))
    tries += [(min(scale, 1.0), 0.0, a, 0.0) for a in cfg.rotations]
    if cfg.cnn_max_side:
        tries.append((min(1.0, cfg.cnn_max_side / long), 0.0, 0.0, max(cfg.cnn_min_score, 1e-6)))
    for sc, pad, angle, cnn in tries:
        found = _dlib_pass(gray, sc, pad, angle, cnn)
        if found:
            break
    if found:
        best = max(s for _, s, _ in found)
        found = [f for f in found if f[1] >= cfg.relative_min_score * best]
    keep = _suppress([(b, s) for b, s, _ in found], cfg.overlap, (h, w))
    marks = {b: m for b, _, m in found}
    dets = [Detection(b, s, "detected", marks[b]) for b, s in keep]
    return sorted(dets, key=lambda d: (d.box[0], d.box[1]))


def landmarks_in(gray: np.ndarray, box: Box) -> np.ndarray:
    """dlib's 5 landmarks ``(5, 2)`` of the face in ``box`` (shape predictor only, no
    detector): for faces found without landmarks and for given crops."""
    import dlib  # optional (the dlib extra), slow to import: only where used

    x, y, w, h = box
    shape = _dlib("shape")(gray, dlib.rectangle(int(x), int(y), int(x + w), int(y + h)))
    return np.array([(p.x, p.y) for p in shape.parts()], np.float64)


def preload_dlib() -> None:
    """dlib's detector and landmark models loaded now, in this thread (when dlib is
    installed), rather than at the first photo."""
    if dlib_missing() is None:
        _dlib("hog")
        _dlib("shape")
