"""Helpers of the photo tests (tests/test_photo_decode.py, test_photo_detect.py,
test_photo_workers.py, test_serve_browser.py): an asymmetric test pattern, in-memory
encoding, and a PNG header that claims any size (a decompression-bomb stand-in)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def pattern(h=60, w=80) -> np.ndarray:
    """An asymmetric RGB test image (orientation mistakes change it)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + 2 * y) % 256], -1).astype(np.uint8)


def encode(img, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG that claims ``w`` x ``h`` pixels (header only): a decompression-bomb stand-in."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
