"""A photo -> its faces, cropped to the model's input contract (:func:`extract_faces`), and
one input image on its way through the analyzer (:class:`Item`, :func:`prepare`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..inputs import GRAY48, InputSpec
from .align import crop_face
from .config import Box, PhotoConfig
from .decode import PhotoError, load_image, to_gray
from .detect import clip_box, find_faces


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
        crop = crop_face(source, gray, None, (0, 0, w, h), cfg, spec, "given")
        return [Face((0, 0, w, h), crop, None, "given")]
    faces = []
    for d in find_faces(gray, cfg):
        crop = crop_face(source, gray, d.landmarks, d.box, cfg, spec, d.kind)
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
