"""Composed test scenes from face photos, with the truth: several faces on one background,
turned faces, small faces, and pictures without a face. Used by tests/test_photo_detect.py and
benchmarks/compare_detectors.py (which puts this folder on sys.path)."""

from __future__ import annotations

import cv2
import numpy as np

Truth = list[tuple[float, float, float]]  # face centre x, y and side, in scene pixels


def background(shape: tuple[int, int], rng: np.random.Generator, sigma: float = 25) -> np.ndarray:
    """Smooth random gray texture, uint8 ``shape``."""
    noise = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), sigma)
    return cv2.normalize(noise, None, 60, 200, cv2.NORM_MINMAX).astype(np.uint8)


def multi_face(faces, sizes, rng, canvas=(720, 960)) -> tuple[np.ndarray, Truth]:
    """``faces`` (uint8 gray or RGB) resized to ``sizes`` and pasted apart on a gray
    background; returns the RGB scene and the truth."""
    h, w = canvas
    img = np.dstack([background(canvas, rng)] * 3)
    truth: Truth = []
    for face, s in zip(faces, sizes, strict=True):
        s = int(s)
        tile = cv2.resize(face, (s, s), interpolation=cv2.INTER_AREA)
        tile = np.dstack([tile] * 3) if tile.ndim == 2 else tile
        for _ in range(500):
            x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            cx, cy = x + s / 2, y + s / 2
            if all(
                abs(cx - a) > (s + b) * 0.65 or abs(cy - c) > (s + b) * 0.65 for a, c, b in truth
            ):
                img[y : y + s, x : x + s] = tile
                truth.append((cx, cy, float(s)))
                break
    return img, truth


def rotated(face: np.ndarray, angle: float, rng, side: int = 400) -> tuple[np.ndarray, Truth]:
    """``face`` turned by ``angle`` degrees (counter-clockwise) in the middle of a
    ``side`` x ``side`` background (the face's corners blend in: the photo is pasted through
    a circular mask)."""
    s = face.shape[0]
    g = face if face.ndim == 2 else cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    img = background((side, side), rng)
    o = (side - s) // 2
    mask = np.zeros((s, s), np.float32)
    cv2.circle(mask, (s // 2, s // 2), int(s * 0.56), 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), s * 0.03)
    big_mask = np.zeros((side, side), np.float32)
    big_mask[o : o + s, o : o + s] = mask
    big_face = img.astype(np.float32)
    big_face[o : o + s, o : o + s] = g
    m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    big_face = cv2.warpAffine(big_face, m, (side, side), borderMode=cv2.BORDER_REPLICATE)
    big_mask = cv2.warpAffine(big_mask, m, (side, side))
    out = big_mask * big_face + (1 - big_mask) * img
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), [(side / 2, side / 2, float(s))]


def no_face(rng) -> list[np.ndarray]:
    """Pictures without a face: uniform, noise, smooth noise, gradient, checkerboard, shapes."""
    out = [np.full((200, 200), 128, np.uint8), rng.integers(0, 256, (240, 320), dtype=np.uint8)]
    out += [background((480, 640), rng, 8), background((200, 200), rng, 4)]
    out.append(np.tile(np.linspace(0, 255, 300, dtype=np.float32), (200, 1)).astype(np.uint8))
    board = ((np.indices((200, 200)) // 25).sum(0) % 2 * 255).astype(np.uint8)
    out.append(board)
    shapes = np.full((300, 300), 200, np.uint8)
    cv2.circle(shapes, (100, 100), 60, 40, -1)
    cv2.rectangle(shapes, (160, 160), (280, 260), 90, -1)
    out.append(shapes)
    return out


def matches(found_boxes, truth: Truth, tol: float = 0.35) -> tuple[int, int]:
    """(faces of ``truth`` found, boxes matching no face): a box matches a face when their
    centres are within ``tol`` x the face's side and its size is within a factor of 2."""
    used, hit = set(), 0
    for cx, cy, s in truth:
        near = [
            k
            for k, (x, y, w, h) in enumerate(found_boxes)
            if abs(x + w / 2 - cx) < tol * s and abs(y + h / 2 - cy) < tol * s and s / 2 < w < 2 * s
        ]
        hit += bool(near)
        used.update(near)
    return hit, len(found_boxes) - len(used)
