"""Photo bytes -> pixels: decode (anything Pillow reads), EXIF orientation, the pixel
limit read from the header before any pixel is decoded, and the conversions the crops use
(:func:`to_gray`, :func:`to_channels`).

``load_image`` returns uint8 ``(H, W)`` for gray or ``(H, W, 3)`` RGB (alpha is composited
on white, 16-bit is scaled to 8-bit). Bad input raises :class:`PhotoError`.
"""

from __future__ import annotations

import errno
import io
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..exceptions import FaceattrsError
from ..inputs import MAX_PIXELS, InputSpec

log = logging.getLogger(__name__)


class PhotoError(FaceattrsError):
    """A photo that cannot be used: unreadable, not an image, truncated, too large, no face."""


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
