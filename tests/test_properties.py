"""Property tests (Hypothesis): whatever a CSV or an image file holds, the readers give a
valid result or the project's own error, never another exception.

Example counts are small and derandomized, so that the suite stays fast and repeatable.
"""

from __future__ import annotations

import gzip
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from faceattrs.data import N_PIXELS, RawFaces, read_faces
from faceattrs.exceptions import FaceattrsError
from faceattrs.labels import AGE_RANGE
from faceattrs.photo import PhotoError, load_image

FAST = settings(
    max_examples=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def valid_csv(n: int = 3) -> bytes:
    rng = np.random.default_rng(0)
    lines = ["age,ethnicity,gender,img_name,pixels"]
    for i in range(n):
        pixels = " ".join(map(str, rng.integers(0, 256, N_PIXELS)))
        lines.append(f"{20 + i},{i % 5},{i % 2},café{i}.jpg,{pixels}")
    return ("\n".join(lines) + "\n").encode()


BASE = valid_csv()


@st.composite
def mutated_csv(draw) -> bytes:
    """One to three mutations of a valid file: bytes deleted, inserted or replaced, a field
    changed, lines dropped or doubled, other line endings, another encoding, gzip (maybe
    truncated), truncation."""
    data = BASE
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                ["delete", "insert", "field", "lines", "endings", "encoding", "gzip", "truncate"]
            )
        )
        n = len(data)
        if kind == "delete" and n:
            i = draw(st.integers(0, n - 1))
            data = data[:i] + data[i + draw(st.integers(1, 50)) :]
        elif kind == "insert":
            i = draw(st.integers(0, n))
            data = data[:i] + draw(st.binary(min_size=1, max_size=20)) + data[i:]
        elif kind == "field":
            lines = data.split(b"\n")
            row = draw(st.integers(0, len(lines) - 1))
            fields = lines[row].split(b",")
            col = draw(st.integers(0, len(fields) - 1))
            fields[col] = draw(
                st.sampled_from([b"", b"-1", b"1e400", b"nan", b"3.5", b"999", b'"', b"x y"])
                | st.binary(max_size=12)
            )
            lines[row] = b",".join(fields)
            data = b"\n".join(lines)
        elif kind == "lines":
            lines = data.split(b"\n")
            row = draw(st.integers(0, len(lines) - 1))
            if draw(st.booleans()):
                del lines[row]
            else:
                lines.insert(row, lines[row])
            data = b"\n".join(lines)
        elif kind == "endings":
            data = data.replace(b"\n", draw(st.sampled_from([b"\r\n", b"\r", b"\n\n"])))
        elif kind == "encoding":
            text = data.decode("utf-8", "replace")
            data = text.encode(draw(st.sampled_from(["utf-16", "latin-1", "utf-8-sig"])), "replace")
        elif kind == "gzip":
            data = gzip.compress(data)
        elif kind == "truncate" and n:
            data = data[: draw(st.integers(0, n - 1))]
    return data


def check_raw(raw: RawFaces) -> None:
    n = len(raw.images)
    assert raw.images.shape == (n, 48, 48) and raw.images.dtype == np.uint8
    for arr in (raw.age, raw.gender, raw.ethnicity, raw.names, raw.lines):
        assert len(arr) == n
    assert n + sum(raw.invalid.values()) == raw.rows_read
    assert len(raw.skipped) == sum(raw.invalid.values())
    if n:
        assert AGE_RANGE[0] <= raw.age.min() and raw.age.max() <= AGE_RANGE[1]
        assert set(raw.gender.tolist()) <= {0, 1} and set(raw.ethnicity.tolist()) <= set(range(5))


@FAST
@given(data=mutated_csv(), on_bad_row=st.sampled_from(["error", "skip"]))
def test_csv_reader_gives_faces_or_its_own_error(data, on_bad_row):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "faces.csv"
        path.write_bytes(data)
        try:
            raw = read_faces(path, on_bad_row)
        except FaceattrsError:
            return
        check_raw(raw)


def test_the_unmutated_file_reads():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "faces.csv"
        path.write_bytes(BASE)
        check_raw(raw := read_faces(path))
        assert len(raw.images) == 3


def encoded(fmt: str, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), np.uint8))
    img.convert(mode).save(buf, format=fmt)
    return buf.getvalue()


REAL = {fmt: encoded(fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")}
HEADERS = [
    b"\x89PNG\r\n\x1a\n",  # PNG signature
    b"\xff\xd8\xff\xe0",  # JPEG SOI + APP0
    b"GIF89a\xff\xff\xff\xff",  # GIF claiming 65535 x 65535
    b"BM" + b"\x00" * 16 + (10**6).to_bytes(4, "little") * 2,  # BMP claiming 10^6 x 10^6
    b"II*\x00",  # TIFF
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",  # WebP
]


@st.composite
def image_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "header", "flipped"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "header":
        return draw(st.sampled_from(HEADERS)) + draw(st.binary(max_size=200))
    real = REAL[draw(st.sampled_from(sorted(REAL)))]
    if kind == "truncated":
        return real[: draw(st.integers(0, len(real) - 1))]
    i = draw(st.integers(0, len(real) - 1))  # one byte changed
    return real[:i] + bytes([draw(st.integers(0, 255))]) + real[i + 1 :]


def check_image(img) -> None:
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8
    assert img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)
    assert img.size > 0


@FAST
@given(data=image_bytes())
def test_photo_decoder_gives_an_image_or_a_photo_error(data):
    try:
        img = load_image(data, max_pixels=4_000_000)
    except PhotoError:
        return
    check_image(img)


@FAST
@given(data=image_bytes())
def test_photo_folder_reader_gives_faces_or_its_own_error(data):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "30_1_2_x.jpg").write_bytes(data)
        try:
            raw = read_faces(d, "skip")
        except FaceattrsError:
            return
        check_raw(raw)
        assert len(raw.images) == 1


@pytest.mark.parametrize("fmt", sorted(REAL))
def test_every_real_format_decodes(fmt):
    check_image(load_image(REAL[fmt]))


def test_a_quote_and_lone_carriage_returns_are_its_own_error_or_rows(tmp_path):
    """Found by the property test: the csv module's own error escaped the reader."""
    path = tmp_path / "faces.csv"
    path.write_bytes(BASE.replace(b"\n", b"\r").replace(b"caf", b'"caf', 1) + b"\x00")
    with pytest.raises(FaceattrsError):
        read_faces(path)
