"""The start of a photo worker process (spawned; it imports this package, never torch)."""

from __future__ import annotations

import cv2
from PIL import Image

from ..lifeline import exit_with_parent
from .detect import preload_dlib


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
    preload_dlib()
