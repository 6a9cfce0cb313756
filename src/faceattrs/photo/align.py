"""One face -> the model's input, in the framing the input contract names (``spec.crop``):
the UTKFace framing (eyes and nose moved onto where they sit in the "aligned & cropped"
200x200 photos, :func:`align_matrix`, :func:`aligned_crop`; or, without landmarks, the
measured margin around the detector's box, :func:`to_face_crop`) or dlib's face chip
(:func:`dlib_chip`). :func:`crop_face` chooses.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..inputs import GRAY48, InputSpec
from .config import Box, PhotoConfig
from .decode import PhotoError, to_channels
from .detect import landmarks_in

CANON = 200  # side of the training faces' frame (UTKFace aligned & cropped photos)


# ---------------------------------------------------------------- the UTKFace framing


def crop_region(box: Box, cfg: PhotoConfig | None = None, margin: bool = True) -> Box:
    """The square region ``(x, y, side, side)`` cropped for a face box (may leave the image).

    With ``margin`` the measured box-to-training-face mapping is applied; without, the
    region is the box padded to a square about its centre.
    """
    cfg = cfg or PhotoConfig()
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    side = max(w, h)
    if margin:
        cx += cfg.margin_shift_x * w
        cy += cfg.margin_shift_y * h
        side *= cfg.margin_scale
    side = max(1, round(side))
    return round(cx - side / 2), round(cy - side / 2), side, side


def to_face_crop(
    image: np.ndarray,
    box: Box,
    cfg: PhotoConfig | None = None,
    margin: bool = True,
    spec: InputSpec = GRAY48,
) -> np.ndarray:
    """The model's input for the face in ``box``: uint8 ``spec.shape`` (by default
    ``(48, 48)`` grayscale; ``(S, S, 3)`` RGB for a colour model).

    The square :func:`crop_region` is cut out (its part outside the image filled by
    replicating the border) and resized with area interpolation, as the training CSV was
    made from whole 200x200 aligned faces.
    """
    x, y, side, _ = crop_region(box, cfg, margin)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + side), min(h, y + side)
    if x1 <= x0 or y1 <= y0:
        raise PhotoError(f"face box {box} lies outside the {w}x{h} image")
    region = to_channels(np.ascontiguousarray(image[y0:y1, x0:x1]), spec)
    top, left, bottom, right = y0 - y, x0 - x, y + side - y1, x + side - x1
    if top or left or bottom or right:
        region = cv2.copyMakeBorder(region, top, bottom, left, right, cv2.BORDER_REPLICATE)
    size = spec.size
    if side == size:
        return np.ascontiguousarray(region)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(region, (size, size), interpolation=interp)


def eye_nose(landmarks: np.ndarray) -> np.ndarray:
    """dlib's 5 points -> ``(3, 2)``: centre of the eye on the image's left, of the other
    eye, and the base of the nose."""
    a, b = landmarks[0:2].mean(0), landmarks[2:4].mean(0)
    left, right = (a, b) if a[0] <= b[0] else (b, a)
    return np.stack([left, right, landmarks[4]])


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares rotation + uniform scale + shift taking points ``src`` to ``dst``
    (both ``(N, 2)``), as a ``(2, 3)`` matrix (Umeyama, without reflection).

    >>> m = similarity(np.array([[0.0, 0], [1, 0]]), np.array([[1.0, 1], [1, 3]]))
    >>> np.round(m, 6).tolist()
    [[0.0, -2.0, 1.0], [2.0, 0.0, 1.0]]
    """
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.sign(np.linalg.det(u @ vt)) or 1.0
    e = np.diag([1.0, sign])
    r = u @ e @ vt
    k = float(np.trace(np.diag(sig) @ e) / ((s**2).sum() / len(src)))
    m = np.empty((2, 3))
    m[:, :2] = k * r
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def align_matrix(landmarks: np.ndarray, cfg: PhotoConfig | None = None, rotate: bool = True):
    """Photo pixels -> the training frame (``CANON`` x ``CANON``): eyes and nose moved onto
    the measured target (``cfg.target_*``). ``rotate=False`` keeps the photo's angle
    (scale and shift only)."""
    cfg = cfg or PhotoConfig()
    src = eye_nose(landmarks)
    dst = np.array([cfg.target_right_eye, cfg.target_left_eye, cfg.target_nose], np.float64)
    m = similarity(src, dst * CANON)
    if not rotate:
        k = float(np.hypot(*m[:, 0]))
        m[:, :2] = np.eye(2) * k
        m[:, 2] = dst.mean(0) * CANON - k * src.mean(0)
    return m


def aligned_crop(image: np.ndarray, matrix: np.ndarray, spec: InputSpec = GRAY48) -> np.ndarray:
    """The model's input through ``matrix`` (photo -> training frame): the frame is
    resampled (bilinear; a large face is first shrunk with area interpolation so that the
    frame is never sampled sparser than 2 photo pixels apart), then resized to the
    model's size with area interpolation, as the training CSV was made from the frames.
    uint8 ``spec.shape``: ``(48, 48)`` gray by default, ``(S, S, 3)`` for an RGB model."""
    gray = to_channels(image, spec)
    h, w = gray.shape[:2]
    m = np.asarray(matrix, np.float64)
    k = float(np.hypot(*m[:, 0]))  # frame pixels per photo pixel
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0], [CANON, 0], [0, CANON], [CANON, CANON]], np.float64)
    pre = corners @ inv[:, :2].T + inv[:, 2]
    x0, y0 = np.floor(pre.min(0)).astype(int) - 1
    x1, y1 = np.ceil(pre.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        raise PhotoError(f"aligned face lies outside the {w}x{h} image")
    region = gray[y0:y1, x0:x1]
    m = m.copy()
    m[:, 2] += m[:, :2] @ np.array([x0, y0], np.float64)
    if k < 0.5:  # shrink first: bilinear sampling would skip pixels
        f = 2 * k
        rh, rw = region.shape[:2]
        size = (max(1, round(rw * f)), max(1, round(rh * f)))
        region = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
        m[:, :2] /= np.array([size[0] / rw, size[1] / rh])[None, :]
    frame = cv2.warpAffine(
        region, m, (CANON, CANON), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    if spec.size == CANON:
        return frame
    interp = cv2.INTER_AREA if spec.size < CANON else cv2.INTER_LINEAR
    return cv2.resize(frame, (spec.size, spec.size), interpolation=interp)


DLIB_PADDING = 0.25  # dlib's face chip: padding around its mean face (dlib's default)


def dlib_chip(image: np.ndarray, landmarks: np.ndarray, spec: InputSpec) -> np.ndarray:
    """dlib's face chip (``dlib.get_face_chip``: the 5 landmarks moved onto dlib's mean
    face, padding 0.25) at ``spec.size``, in ``spec``'s channels: the crop dlib's
    face-recognition network was trained on."""
    import dlib  # optional (the dlib extra), slow to import: only where used

    pts = dlib.points([dlib.point(round(float(x)), round(float(y))) for x, y in landmarks])
    (x0, y0), (x1, y1) = landmarks.min(0), landmarks.max(0)
    rect = dlib.rectangle(int(x0), int(y0), int(x1) + 1, int(y1) + 1)
    rgb = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    chip = dlib.get_face_chip(np.ascontiguousarray(rgb), dlib.full_object_detection(rect, pts),
                              size=spec.size, padding=DLIB_PADDING)  # fmt: skip
    return to_channels(chip, spec)


# where the face sits in a given crop (detect=False) when the dlib crop must find its
# landmarks: the median box of dlib's HOG detector on UTKFace's aligned chips (found on 297
# of 300 chips drawn with seed 0; spread +-0.07-0.08)
GIVEN_FACE = (0.075, 0.075, 0.9, 0.9)  # x, y, width, height as shares of the crop


def crop_face(source, gray, landmarks, box, cfg, spec: InputSpec, kind: str) -> np.ndarray:
    """The model's input for one face, in the framing ``spec.crop`` names."""
    if spec.crop == "dlib":
        if landmarks is None:
            if kind == "given":  # the whole image is the face: where a chip's face sits
                h, w = gray.shape
                gx, gy, gw, gh = GIVEN_FACE
                box = (round(gx * w), round(gy * h), round(gw * w), round(gh * h))
            landmarks = landmarks_in(gray, box)
        return dlib_chip(source, landmarks, spec)
    if landmarks is not None:
        return aligned_crop(source, align_matrix(landmarks, cfg, rotate=cfg.align), spec)
    return to_face_crop(source, box, cfg, margin=kind == "detected", spec=spec)
