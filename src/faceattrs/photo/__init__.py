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

By concept: ``decode`` (bytes -> pixels, the pixel limit, Pillow's guard), ``config``
(:class:`PhotoConfig`), ``detect`` (Haar and dlib detectors, landmarks), ``align`` (the
model's input from one face, in the framing its input contract names), ``faces``
(:func:`extract_faces`, :func:`prepare`), ``worker`` (a photo worker process's start;
the package imports neither torch nor the rest of faceattrs' model code).

>>> import numpy as np
>>> crop = to_face_crop(np.zeros((200, 200), np.uint8), (50, 50, 100, 100))
>>> crop.shape, crop.dtype
((48, 48), dtype('uint8'))
>>> extract_faces(np.full((80, 100, 3), 90, np.uint8), detect=False)[0].box
(0, 0, 100, 80)
"""

from ..inputs import MAX_PIXELS
from .align import (
    CANON,
    DLIB_PADDING,
    GIVEN_FACE,
    align_matrix,
    aligned_crop,
    crop_face,
    crop_region,
    dlib_chip,
    eye_nose,
    similarity,
    to_face_crop,
)
from .config import Box, PhotoConfig
from .decode import PhotoError, load_image, pillow_limit_lifted, to_channels, to_gray
from .detect import (
    Detection,
    clip_box,
    detect_faces,
    dlib_missing,
    find_faces,
    landmarks_in,
    preload_dlib,
)
from .faces import Face, Item, extract_faces, prepare
from .worker import worker_start

__all__ = [
    "CANON",
    "DLIB_PADDING",
    "GIVEN_FACE",
    "MAX_PIXELS",
    "Box",
    "Detection",
    "Face",
    "Item",
    "PhotoConfig",
    "PhotoError",
    "align_matrix",
    "aligned_crop",
    "clip_box",
    "crop_face",
    "crop_region",
    "detect_faces",
    "dlib_chip",
    "dlib_missing",
    "extract_faces",
    "eye_nose",
    "find_faces",
    "landmarks_in",
    "load_image",
    "pillow_limit_lifted",
    "preload_dlib",
    "prepare",
    "similarity",
    "to_channels",
    "to_face_crop",
    "to_gray",
    "worker_start",
]
