"""Read faces: the public CSV layout (plain or gzip) or a folder of UTKFace-style photos.

Every row is validated. By default the first bad row is an error naming the file, the
line and the column; with ``on_bad_row="skip"`` bad rows are dropped and each reason is
counted. Pixels are parsed with vectorised numpy, never a Python loop per number.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .exceptions import FaceattrsError
from .inputs import GRAY48, InputSpec, links_not_searched
from .labels import AGE_RANGE, ETHNICITIES, IMAGE_SIZE

log = logging.getLogger(__name__)

N_PIXELS = IMAGE_SIZE * IMAGE_SIZE
REQUIRED = ("age", "ethnicity", "gender", "pixels")
PHOTO_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_[^/]*$")
PHOTO_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
csv.field_size_limit(1 << 24)


class DataError(FaceattrsError):
    """Input that cannot be read as faces; the message names file, line and column."""


@dataclass
class RawFaces:
    """Rows as read, before de-duplication: the arrays of a FaceSet without a split,
    plus ``lines`` (1-based line of each row in the file, or 0 for photos), the counts
    of skipped rows by rule (``invalid``) and each skipped row as ``(line, name, reason)``
    (``skipped``)."""

    images: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    ethnicity: np.ndarray
    names: np.ndarray
    lines: np.ndarray
    rows_read: int = 0
    invalid: Counter = field(default_factory=Counter)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    # the faces in another format than ``images`` (48x48 gray, what de-duplication compares),
    # e.g. (N, 96, 96, 3) RGB for a colour model; None = ``images`` themselves
    faces: np.ndarray | None = None


def read_faces(path: str | Path, on_bad_row: str = "error", spec: InputSpec = GRAY48) -> RawFaces:
    """A CSV / CSV.gz file or a folder of photos -> :class:`RawFaces`, the faces also in
    ``spec``'s size and channels (``faces``) when that is not 48x48 grayscale (photos only:
    a CSV holds 48x48 grayscale faces)."""
    path = Path(path)
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row must be 'error' or 'skip', not {on_bad_row!r}")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return read_photo_folder(path, on_bad_row, spec)
    if spec.shape != GRAY48.shape or spec.crop != GRAY48.crop:
        raise DataError(
            f"{path}: a CSV holds 48x48 grayscale faces, not {spec.describe()}; "
            "prepare a folder of photos for those"
        )
    return read_csv(path, on_bad_row)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8-sig")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text CSV file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def read_csv(path: str | Path, on_bad_row: str = "error") -> RawFaces:
    """Read the public CSV layout; extra columns are ignored, column order is free."""
    path = Path(path)
    try:
        rows, lines, header = _split_rows(_read_text(path))
    except csv.Error as e:  # e.g. a NUL byte, or a quote left open
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    if not header or not any(h.strip() for h in header):
        raise DataError(
            f"{path}: empty file (expected a header: age,ethnicity,gender,img_name,pixels)"
        )
    cols = {h.strip().lower(): i for i, h in enumerate(header)}
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise DataError(f"{path}: line 1: missing column(s) {', '.join(missing)}; found {header}")
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    lines = np.asarray(lines, np.int64)
    need = max(cols[c] for c in REQUIRED) + 1
    # errors[i]: (column, message, rule); the rule (the message without the row's own
    # value) groups skipped rows in the report
    errors: list[tuple[str, str, str] | None] = [None] * len(rows)
    for i, row in enumerate(rows):
        if len(row) < need:
            errors[i] = (
                "pixels",
                f"row has {len(row)} fields, header has {len(header)}",
                f"fewer fields than the header's {len(header)}",
            )
    get = lambda c: [r[cols[c]] if len(r) > cols[c] else "" for r in rows]  # noqa: E731
    labels = {}
    for col, lo, hi in (
        ("age", *AGE_RANGE),
        ("gender", 0, 1),
        ("ethnicity", 0, len(ETHNICITIES) - 1),
    ):
        labels[col] = _parse_labels(get(col), col, lo, hi, errors)
    images, pix_err = parse_pixels(get("pixels"))
    for i in np.flatnonzero(pix_err != ""):
        errors[i] = errors[i] or ("pixels", str(pix_err[i]), _pixel_rule(str(pix_err[i])))
    names = np.asarray(get("img_name") if "img_name" in cols else [""] * len(rows))
    return _finish(path, images, labels, names, lines, errors, on_bad_row)


def _split_rows(text: str) -> tuple[list[list[str]], list[int], list[str] | None]:
    """Rows, their 1-based line numbers and the header. Plain ``str.split`` when nothing
    is quoted (the public file), the csv module otherwise."""
    if '"' in text:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        rows, lines = [], []
        for row in reader:
            if row and any(f.strip() for f in row):
                rows.append(row)
                lines.append(reader.line_num)
        return rows, lines, header
    all_lines = text.split("\n")
    header = all_lines[0].rstrip("\r").split(",") if all_lines else None
    rows, lines = [], []
    for i, line in enumerate(all_lines[1:], start=2):
        if line.strip():
            rows.append(line.rstrip("\r").split(","))
            lines.append(i)
    return rows, lines, header


def _parse_labels(values: list[str], col: str, lo: int, hi: int, errors: list) -> np.ndarray:
    """Integers in [lo, hi]; 20k calls of int() are cheap next to the pixels."""
    out = np.zeros(len(values), np.int16)
    for i, v in enumerate(values):
        v = v.strip()
        try:
            x = int(float(v)) if v and float(v).is_integer() else int(v)
        except (ValueError, OverflowError):
            msg = "missing value" if not v else f"not an integer: {v[:20]!r}"
            errors[i] = errors[i] or (col, msg, "missing value" if not v else "not an integer")
            continue
        if not lo <= x <= hi:
            errors[i] = errors[i] or (col, f"{x} is outside {lo}..{hi}", f"outside {lo}..{hi}")
            continue
        out[i] = x
    return out


def parse_pixels(fields: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Space-separated pixel strings -> ``(N, 48, 48)`` uint8 and an error message per row
    ("" when valid). Each row is parsed in C by numpy; only bad rows are looked at again,
    in Python, to say what is wrong with them.

    >>> imgs, err = parse_pixels([" ".join(["7"] * 2304), "1 2 x", " ".join(["300"] * 2304)])
    >>> int(imgs[0, 0, 0]), list(err)
    (7, ['', 'non-integer pixel value', 'pixel value 300 outside 0..255'])
    """
    n = len(fields)
    images = np.zeros((n, N_PIXELS), np.uint8)
    errors = np.full(n, "", dtype=object)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a partial parse warns: make it an exception
        for i, text in enumerate(fields):
            try:
                values = np.fromstring(text, dtype=np.int64, sep=" ")
            except (ValueError, DeprecationWarning):
                values = None
            if values is None or len(values) != N_PIXELS or values.min() < 0 or values.max() > 255:
                errors[i] = _pixel_error(text)
                continue
            images[i] = values
    return images.reshape(n, IMAGE_SIZE, IMAGE_SIZE), errors


def _pixel_error(text: str) -> str:
    """The reason a pixel string is invalid (slow path, bad rows only)."""
    tokens = text.split()
    for t in tokens:
        if not t.isdigit():
            return (
                "non-integer pixel value"
                if not t.lstrip("-").isdigit()
                else (f"pixel value {t[:12]} outside 0..255")
            )
        if int(t) > 255:
            return f"pixel value {t[:12]} outside 0..255"
    return f"{len(tokens)} pixel values, expected {N_PIXELS}"


def _pixel_rule(msg: str) -> str:
    """The rule a pixel-string error breaks, without the row's own value."""
    if msg.startswith("pixel value"):
        return "pixel value outside 0..255"
    if msg.endswith(f"expected {N_PIXELS}"):
        return f"not {N_PIXELS} pixel values"
    return msg


def _finish(path, images, labels, names, lines, errors, on_bad_row, faces=None) -> RawFaces:
    bad = [i for i, e in enumerate(errors) if e is not None]
    invalid: Counter = Counter()
    skipped: list[tuple[int, str, str]] = []
    if bad:
        i = bad[0]
        col, msg, _ = errors[i]
        where = f"line {lines[i]}" if lines[i] else f"file {names[i]}"
        if on_bad_row == "error":
            more = (
                f" ({len(bad) - 1} more bad rows; --on-bad-row skip drops them)"
                if len(bad) > 1
                else ""
            )
            raise DataError(f"{path}: {where}: column {col!r}: {msg}{more}")
        if len(bad) == len(images):
            col, msg, _ = errors[bad[0]]
            raise DataError(
                f"{path}: every one of the {len(bad)} rows is invalid, nothing to keep "
                f"(first: {where}: column {col!r}: {msg})"
            )
        for i in bad:
            col, msg, rule = errors[i]
            invalid[f"{col}: {rule}"] += 1
            skipped.append((int(lines[i]), str(names[i]), f"invalid {col}: {msg}"))
        log.warning("%s: skipped %d bad rows (%s)", path, len(bad), dict(invalid))
    keep = np.setdiff1d(np.arange(len(images)), bad)
    return RawFaces(
        images=images[keep],
        age=labels["age"][keep].astype(np.int16),
        gender=labels["gender"][keep].astype(np.int8),
        ethnicity=labels["ethnicity"][keep].astype(np.int8),
        names=np.asarray(names)[keep].astype(str),
        lines=lines[keep],
        rows_read=len(images),
        invalid=invalid,
        skipped=skipped,
        faces=None if faces is None else faces[keep],
    )


def read_photo_folder(
    folder: str | Path, on_bad_row: str = "error", spec: InputSpec = GRAY48
) -> RawFaces:
    """UTKFace-style photos ``AGE_GENDER_ETHNICITY_*.jpg`` (any size, colour or gray) ->
    48x48 grayscale with area interpolation, as the public CSV was made (bit for bit: the
    shared chips give the CSV's pixels), and, for another ``spec``, the whole photo
    resized to its size in its channels (``faces``). Files whose names carry no labels
    are skipped and counted."""
    # OpenCV: only for photo folders (the CLI imports this module for --help: kept light)
    import cv2

    folder = Path(folder)
    files, linked_dirs = photo_files(folder)
    unlabelled = [p for p in files if not PHOTO_NAME.match(p.name)]
    files = [p for p in files if PHOTO_NAME.match(p.name)]
    if not files:
        hint = f" ({links_not_searched(folder, linked_dirs)})" if linked_dirs else ""
        raise DataError(f"{folder}: no labelled photos named AGE_GENDER_ETHNICITY_*.jpg{hint}")
    images = np.zeros((len(files), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    other = spec.shape != GRAY48.shape or spec.crop != GRAY48.crop
    faces = np.zeros((len(files), *spec.shape), np.uint8) if other else None
    errors: list = [None] * len(files)
    for i, p in enumerate(tqdm(files, "reading photos", unit="photo", disable=len(files) < 500,
                               leave=False)):  # fmt: skip
        img, why = _decode_gray(p, cv2)
        if img is None:
            errors[i] = ("image", why, why)
            continue
        images[i] = cv2.resize(img, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
        if other:
            faces[i] = _resized(p, spec, cv2, img)
    parts = [PHOTO_NAME.match(p.name).groups() for p in files]
    labels = {}
    for j, (col, lo, hi) in enumerate(
        (("age", *AGE_RANGE), ("gender", 0, 1), ("ethnicity", 0, len(ETHNICITIES) - 1))
    ):
        labels[col] = _parse_labels([t[j] for t in parts], col, lo, hi, errors)
    names = np.asarray([str(p.relative_to(folder)) for p in files])
    raw = _finish(folder, images, labels, names, np.zeros(len(files), np.int64), errors, on_bad_row,
                  faces)  # fmt: skip
    if linked_dirs:  # after the rows are read: a bad input stays one error line, no warning
        log.warning("%s: %s", folder, links_not_searched(folder, linked_dirs))
    if unlabelled:
        raw.invalid["unlabelled photo name"] += len(unlabelled)
        raw.skipped += [
            (0, str(u.relative_to(folder)), "unlabelled photo name") for u in unlabelled
        ]
        log.warning(
            "%s: skipped %d photos without AGE_GENDER_ETHNICITY_ names", folder, len(unlabelled)
        )
    raw.rows_read += len(unlabelled)
    return raw


def photo_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Files with a photo extension under ``folder`` (broken symlinks included, so that
    they are reported; folders named like photos excluded), and the symlinked folders
    that are not searched (a link may loop)."""
    files, linked_dirs = [], []
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                linked_dirs.append(Path(root, d))
        for n in names:
            p = Path(root, n)
            if p.suffix.lower() in PHOTO_EXTS and (p.is_symlink() or p.is_file()):
                files.append(p)
    return sorted(files), sorted(linked_dirs)


def _resized(path: Path, spec: InputSpec, cv2, gray: np.ndarray) -> np.ndarray:
    """The photo at ``spec``'s size (area interpolation when shrinking) in its channels
    (RGB decoded again in colour; ``gray`` is the grayscale decode). The photos are
    UTKFace's framing already; for ``spec.crop == "dlib"`` dlib's chip is cut from them
    (landmarks found where a chip's face sits: :data:`faceattrs.photo.GIVEN_FACE`)."""
    img = gray
    if spec.channels == 3:
        bgr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if spec.crop != "utkface":
        from .photo.faces import extract_faces  # dlib: only for this framing

        return extract_faces(img, detect=False, spec=spec)[0].crop
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if min(h, w) >= spec.size else cv2.INTER_LINEAR
    return cv2.resize(img, (spec.size, spec.size), interpolation=interp)


def _decode_gray(path: Path, cv2) -> tuple[np.ndarray | None, str]:
    """Decode one photo to grayscale; ``(None, why)`` when it cannot be used."""
    if path.is_symlink() and not path.exists():
        return None, "broken or looping symbolic link"
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    if data.size == 0:
        return None, "empty file (0 bytes)"
    try:
        img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    except cv2.error:
        img = None
    return (img, "") if img is not None else (None, "not a readable image")
