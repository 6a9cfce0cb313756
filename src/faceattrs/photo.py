"""Photos in, model-sized faces out: decode, orientation, face detection, alignment, crop.

``load_image`` decodes JPEG, PNG, WebP, BMP, TIFF (anything Pillow reads), applies the
EXIF orientation and returns uint8 ``(H, W)`` for gray or ``(H, W, 3)`` RGB (alpha is
composited on white, 16-bit is scaled to 8-bit). ``extract_faces`` finds every face
(:func:`find_faces`: dlib's HOG detector with retries and its CNN detector, 5 landmarks
per face; model files from the face_recognition_models package, nothing downloaded) and
aligns each one the way the training faces were made: eyes and nose moved onto where
they sit in the UTKFace "aligned & cropped" 200x200 photos (:func:`align_matrix`), then
grayscale, resized to 48x48 with area interpolation (:func:`aligned_crop`). Without dlib
(or ``detector="haar"``) OpenCV's bundled Haar cascades find the faces and the crop is the
measured margin around the box (:func:`detect_faces`, :func:`to_face_crop`). Bad input
raises :class:`PhotoError`. Measured in docs/photos.md.

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

>>> import numpy as np
>>> crop = to_face_crop(np.zeros((200, 200), np.uint8), (50, 50, 100, 100))
>>> crop.shape, crop.dtype
((48, 48), dtype('uint8'))
>>> extract_faces(np.full((80, 100, 3), 90, np.uint8), detect=False)[0].box
(0, 0, 100, 80)
"""

from __future__ import annotations

import errno
import importlib.util
import io
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .exceptions import FaceattrsError
from .inputs import GRAY48, MAX_PIXELS, InputSpec
from .lifeline import exit_with_parent

log = logging.getLogger(__name__)


@contextmanager
def pillow_limit_lifted() -> Iterator[None]:
    """Within: Pillow's process-wide decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``,
    checked in ``Image.open`` with its own wording, whatever ``max_pixels`` says) off, so
    that :func:`load_image`'s own check (``_check_size``: the size read from the header,
    before any pixel is decoded) is the only limit and ``max_pixels=0`` means no limit.

    For processes faceattrs owns: its commands that decode photos (those with
    ``--max-pixels``: predict, serve, explain; :func:`faceattrs.cli.main`), and so their
    photo worker processes, which take the parent's setting. A program that imports
    faceattrs keeps Pillow's guard unless it enters this itself; a refusal by that guard
    is one :class:`PhotoError` too.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


Box = tuple[int, int, int, int]  # x, y, width, height in image pixels


class PhotoError(FaceattrsError):
    """A photo that cannot be used: unreadable, not an image, truncated, too large, no face."""


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


@dataclass
class Face:
    """One face of a photo: ``box`` (x, y, w, h) in the photo, the model's 48x48 uint8 ``crop``,
    the detector's ``score`` (Haar level weight, higher = surer; None when not detected) and
    ``kind``: "detected", "whole" (tight crop, whole image used) or "given" (``detect=False``)."""

    box: Box
    crop: np.ndarray
    score: float | None = None
    kind: str = "detected"
    landmarks: np.ndarray | None = None  # dlib's 5 points (5, 2) in the photo, or None


# ---------------------------------------------------------------- decoding


def load_image(src, max_pixels: int | None = None) -> np.ndarray:
    """Decode ``src`` to uint8 ``(H, W)`` (gray) or ``(H, W, 3)`` (RGB), EXIF-oriented.

    ``src``: a path, encoded bytes, a PIL image or a numpy array (``(H, W)``,
    ``(H, W, 1|3|4)``, RGB order; uint8, uint16, bool or finite float in [0, 1]).
    Raises :class:`PhotoError` for a missing or unreadable path, an empty, truncated or
    non-image file, an array with NaN or infinite values, or an image over ``max_pixels``
    (default :data:`MAX_PIXELS`; 0 = no limit), checked from the header before decoding.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(src, np.ndarray):
        return _from_array(src, "array")
    if isinstance(src, Image.Image):
        _check_size(src.size, limit, "image")
        try:
            src.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise PhotoError(f"image: truncated or corrupt ({e})") from None
        return _from_pil(_orient(src, "image"), "image")
    if isinstance(src, bytes | bytearray | memoryview):
        name, data = "data", bytes(src)
        if not data:
            raise PhotoError("empty data (0 bytes): not an image")
        return _decode(io.BytesIO(data), name, limit)
    if not isinstance(src, str | os.PathLike):
        raise PhotoError(f"cannot read an image from a {type(src).__name__}")
    path = Path(src)
    if not path.exists():
        raise PhotoError(f"{path}: {_why_missing(path)}")
    if path.is_dir():
        raise PhotoError(f"{path}: is a folder, not an image")
    try:
        size = path.stat().st_size
        if size == 0:
            raise PhotoError(f"{path}: empty file (0 bytes)")
        with open(path, "rb") as fh:
            return _decode(fh, str(path), limit)
    except PermissionError as e:
        raise PhotoError(f"{path}: cannot be read ({e.strerror})") from None
    except OSError as e:
        raise PhotoError(f"{path}: cannot be read ({e})") from None


def _why_missing(path: Path) -> str:
    """Why ``path``, which does not exist as far as ``Path.exists`` says, cannot be opened:
    no such file, a symbolic link loop, or a broken symbolic link (and where it points)."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"cannot be read ({e.strerror})"
    if path.is_symlink():
        return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
    return "no such file"


def _decode(fh, name: str, limit: int) -> np.ndarray:
    try:
        im = Image.open(fh)  # reads the header only
    except UnidentifiedImageError:
        raise PhotoError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:  # only if other code re-enabled Pillow's guard
        raise PhotoError(_pillow_guard(name, e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise PhotoError(f"{name}: truncated or corrupt image ({e})") from None
    with im:
        _check_size(im.size, limit, name)  # the only pixel limit, before decoding
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise PhotoError(_pillow_guard(name, e)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise PhotoError(f"{name}: truncated or corrupt image ({e})") from None
        return _from_pil(_orient(im, name), name)


def _pillow_guard(name: str, e: Exception) -> str:
    """Pillow's own guard refused (a program using faceattrs keeps it: see
    :func:`pillow_limit_lifted`): one line, saying how to leave the limit to faceattrs."""
    return (
        f"{name}: refused by Pillow's own pixel limit (PIL.Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS}: {e}); faceattrs' commands leave the limit to "
        "--max-pixels; a program can with faceattrs.photo.pillow_limit_lifted()"
    )


def _check_size(size: tuple[int, int], limit: int, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise PhotoError(f"{name}: empty image ({w}x{h})")
    if limit and w * h > limit:
        raise PhotoError(
            f"{name}: {w}x{h} is {w * h / 1e6:.1f} megapixels, over the limit of "
            f"{limit / 1e6:g} megapixels (a decompression-bomb guard; raise it with --max-pixels)"
        )


def _orient(im: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # a broken EXIF block must not lose an otherwise good photo
        log.warning("%s: EXIF orientation ignored (%s)", name, e)
        return im


def _from_pil(im: Image.Image, name: str) -> np.ndarray:
    mode = im.mode
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"))
    if mode.startswith("I;16"):
        return _from_array(np.asarray(im).astype(np.uint16), name)
    if mode in ("I", "F"):
        return _from_array(np.asarray(im), name)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode not in ("RGB", "RGBA", "LA", "La", "RGBa", "PA"):
        try:
            im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV
        except ValueError as e:
            raise PhotoError(f"{name}: unsupported image mode {mode!r} ({e})") from None
    if im.mode in ("LA", "La", "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        return _from_array(np.asarray(im.convert("RGBA")), name)
    return np.asarray(im.convert("RGB"))


def _from_array(a: np.ndarray, name: str) -> np.ndarray:
    """Any supported array -> uint8 (H, W) or (H, W, 3)."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise PhotoError(f"{name}: expected (H, W), (H, W, 3) or (H, W, 4) pixels, got {a.shape}")
    if a.dtype == np.uint8:
        out = a
    elif a.dtype == bool:
        out = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():  # NaN would silently become black, inf white
            n = int((bad.any(axis=2) if bad.ndim == 3 else bad).sum())
            raise PhotoError(
                f"{name}: {n} of {a.shape[0] * a.shape[1]} pixels "
                f"{'is' if n == 1 else 'are'} NaN or infinite (float pixels must be finite)"
            )
        a = a.astype(np.float32)
        peak = float(a.max())
        scale = 255.0 if peak <= 1.0 else (1.0 if peak <= 255.0 else 255.0 / 65535.0)
        out = np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype == np.uint16:  # keep the high byte, as Pillow does for 16-bit colour
        out = (a >> 8).astype(np.uint8)
    elif a.dtype.kind in "iu":
        # other integers (Pillow's 32-bit "I"): 16-bit values if any exceeds 8 bits
        wide = a.astype(np.int64)
        out = np.clip(wide, 0, 65535) >> 8 if wide.max() > 255 else np.clip(wide, 0, 255)
        out = out.astype(np.uint8)
    else:
        raise PhotoError(f"{name}: unsupported pixel type {a.dtype}")
    if out.ndim == 3 and out.shape[2] == 4:  # composite on white
        alpha = out[..., 3:4].astype(np.float32) / 255.0
        rgb = out[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        out = (rgb + 0.5).astype(np.uint8)
    return np.ascontiguousarray(out)


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W)`` or RGB ``(H, W, 3)`` -> ``(H, W)`` (ITU-R 601 luma, as Pillow's "L")."""
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def to_channels(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``image`` (gray or RGB) in ``spec``'s channels: gray ``(H, W)`` or RGB ``(H, W, 3)``."""
    if spec.channels == 1:
        return to_gray(image)
    return image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)


# ---------------------------------------------------------------- detection


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


# ---------------------------------------------------------------- cropping


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


# ---------------------------------------------------------------- dlib: detection, landmarks

CANON = 200  # side of the training faces' frame (UTKFace aligned & cropped photos)


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
        import dlib

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
    import dlib

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
    import dlib

    pts = dlib.points([dlib.point(round(float(x)), round(float(y))) for x, y in landmarks])
    (x0, y0), (x1, y1) = landmarks.min(0), landmarks.max(0)
    rect = dlib.rectangle(int(x0), int(y0), int(x1) + 1, int(y1) + 1)
    rgb = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    chip = dlib.get_face_chip(np.ascontiguousarray(rgb), dlib.full_object_detection(rect, pts),
                              size=spec.size, padding=DLIB_PADDING)  # fmt: skip
    return to_channels(chip, spec)


def landmarks_in(gray: np.ndarray, box: Box) -> np.ndarray:
    """dlib's 5 landmarks ``(5, 2)`` of the face in ``box`` (shape predictor only, no
    detector): for faces found without landmarks and for given crops."""
    import dlib

    x, y, w, h = box
    shape = _dlib("shape")(gray, dlib.rectangle(int(x), int(y), int(x + w), int(y + h)))
    return np.array([(p.x, p.y) for p in shape.parts()], np.float64)


# where the face sits in a given crop (detect=False) when the dlib crop must find its
# landmarks: the median box of dlib's HOG detector on UTKFace's aligned chips (found on 297
# of 300 chips drawn with seed 0; spread +-0.07-0.08)
GIVEN_FACE = (0.075, 0.075, 0.9, 0.9)  # x, y, width, height as shares of the crop


def _crop(source, gray, landmarks, box, cfg, spec: InputSpec, kind: str) -> np.ndarray:
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


def extract_faces(
    image, detect: bool = True, cfg: PhotoConfig | None = None, spec: InputSpec = GRAY48
) -> list[Face]:
    """Every face of ``image`` (anything :func:`load_image` takes), left to right, each
    cropped to the input contract ``spec`` (the model's: ``bundle.input``).

    ``detect=False`` treats the whole image as one already-cropped face (padded to a
    square, no margin). An empty list means no face was found.
    """
    cfg = cfg or PhotoConfig()
    image = load_image(image, cfg.max_pixels)  # arrays that are already uint8 pass unchanged
    h, w = image.shape[:2]
    gray = to_gray(image)
    source = gray if spec.channels == 1 else image  # crops in the model's channels
    if not detect:
        crop = _crop(source, gray, None, (0, 0, w, h), cfg, spec, "given")
        return [Face((0, 0, w, h), crop, None, "given")]
    faces = []
    for d in find_faces(gray, cfg):
        crop = _crop(source, gray, d.landmarks, d.box, cfg, spec, d.kind)
        faces.append(
            Face(clip_box(d.box, gray.shape), crop, round(d.score, 3), d.kind, d.landmarks)
        )
    return faces


# ---------------------------------------------------------------- one photo, whole


@dataclass
class Item:
    """One input image on its way through :class:`faceattrs.predict.FaceAnalyzer`."""

    index: int  # position in the input
    file: str | None  # the path, None for in-memory images
    image: np.ndarray | None = None  # decoded pixels (kept for annotation)
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    records: list[dict] = field(default_factory=list)

    def head(self) -> dict:
        """Where a record comes from: the path (None in memory) and the position in the input."""
        return {"file": self.file, "image": self.index}


def prepare(
    index: int,
    src,
    detect: bool = True,
    cfg: PhotoConfig | None = None,
    raise_errors: bool = False,
    keep_image: bool = True,
    spec: InputSpec = GRAY48,
) -> Item:
    """Decode ``src`` and find its faces, cropped to ``spec`` (the model's input contract):
    the :class:`Item` at ``index``. An unusable image (or one without a face) raises
    :class:`PhotoError` with ``raise_errors``, else its message is kept in ``item.error``.
    ``keep_image=False`` drops the decoded pixels."""
    cfg = cfg or PhotoConfig()
    is_path = isinstance(src, str | os.PathLike)
    item = Item(index, str(src) if is_path else None)
    try:
        item.image = load_image(src, cfg.max_pixels)
        item.faces = extract_faces(item.image, detect=detect, cfg=cfg, spec=spec)
        if not item.faces:
            raise PhotoError(f"{src if is_path else 'image'}: no face found")
    except PhotoError as e:
        if raise_errors:
            raise
        item.error, item.faces = str(e), []
    if not keep_image:
        item.image = None
    return item


def worker_start(
    pillow_limit: int | None = Image.MAX_IMAGE_PIXELS, parent: int | None = None
) -> None:
    """Start of a photo worker process (:class:`faceattrs.predict.FaceAnalyzer` with
    ``photo_workers="processes"``): the process ends when ``parent`` (the pid of the
    process that started it) ends, however it ends (:func:`faceattrs.lifeline.exit_with_parent`);
    one OpenCV thread (the process is one of a core's workers), the parent's Pillow guard
    (``pillow_limit``: None inside a faceattrs command, Pillow's own in a program that
    kept it), and the detector's models loaded before the first photo."""
    if parent is not None:
        exit_with_parent(parent)
    cv2.setNumThreads(1)
    Image.MAX_IMAGE_PIXELS = pillow_limit  # photos decode here as in the parent
    if dlib_missing() is None:
        _dlib("hog")
        _dlib("shape")
