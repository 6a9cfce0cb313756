"""Decoding photos (faceattrs.photo.decode): formats, EXIF orientation, modes and bit
depths, arrays, bad input, the pixel limit and Pillow's own guard, non-finite pixels.
Detection and crops are in test_photo_detect.py."""

from __future__ import annotations

import json
import re
import struct

import cv2
import numpy as np
import pytest
from photo_helpers import encode, pattern, png_header
from PIL import Image

from faceattrs import photo
from faceattrs.photo import PhotoConfig, PhotoError, decode, extract_faces, load_image


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "JPEG"])
def test_formats_decode_to_rgb(fmt):
    img = pattern()
    kw = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    out = load_image(encode(img, fmt, **kw))
    assert out.shape == img.shape and out.dtype == np.uint8
    tol = 12 if fmt == "JPEG" else 0
    assert np.abs(out.astype(int) - img).mean() <= tol


def test_path_pil_and_array_inputs_agree(tmp_path):
    img = pattern()
    path = tmp_path / "p.png"
    Image.fromarray(img).save(path)
    for src in (path, str(path), Image.open(path), img, path.read_bytes()):
        assert np.array_equal(load_image(src), img)


@pytest.mark.parametrize("orientation,undo", [(3, 2), (6, 1), (8, -1)])
def test_exif_orientation_is_applied(orientation, undo):
    img = pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.rot90(img, undo)  # what a camera stores; the tag says how to turn it upright
    out = load_image(encode(stored, "PNG", exif=exif.tobytes()))
    assert np.array_equal(out, img)


def test_gray_rgba_palette_and_16_bit():
    gray = pattern()[..., 0]
    assert np.array_equal(load_image(encode(gray, "PNG")), gray)  # (H, W) stays 2-D
    rgba = np.dstack([pattern(), np.full((60, 80), 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white
    out = load_image(encode(rgba, "PNG"))
    assert out.shape == (60, 80, 3)
    assert (out[:10, :10] == 255).all() and np.array_equal(out[20:, 20:], rgba[20:, 20:, :3])
    assert load_image(encode(Image.fromarray(pattern()).convert("P"), "PNG")).shape == (60, 80, 3)
    assert load_image(encode(Image.fromarray(gray).convert("LA"), "PNG")).shape == (60, 80, 3)
    cmyk = load_image(encode(Image.fromarray(pattern()).convert("CMYK"), "JPEG"))
    assert cmyk.shape == (60, 80, 3)
    g16 = (np.arange(60 * 80, dtype=np.uint32).reshape(60, 80) * 13 % 65536).astype(np.uint16)
    ok, png16 = cv2.imencode(".png", g16)
    assert np.array_equal(load_image(png16.tobytes()), (g16 >> 8).astype(np.uint8))
    rgb16 = np.dstack([g16, g16[::-1], g16[:, ::-1]])
    ok, tif16 = cv2.imencode(".tiff", rgb16[..., ::-1])  # OpenCV writes BGR
    assert np.abs(load_image(tif16.tobytes()).astype(int) - (rgb16 >> 8)).max() <= 1


def test_array_dtypes():
    assert np.array_equal(load_image(np.ones((4, 5), np.float32)), np.full((4, 5), 255))
    assert load_image(np.zeros((4, 5, 1), np.uint8)).shape == (4, 5)
    assert load_image(np.full((4, 5), 65535, np.uint16)).max() == 255
    assert load_image(np.eye(4, dtype=bool)).max() == 255
    with pytest.raises(PhotoError, match="expected"):
        load_image(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(PhotoError, match="cannot read an image from a int"):
        load_image(3)


@pytest.fixture
def lifted(monkeypatch):
    """Pillow's own guard off, as in faceattrs' commands (cli.main) and photo workers."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)


def test_bad_inputs_raise_clear_errors(tmp_path, monkeypatch, lifted):
    cases = {
        "not_image.jpg": (b"hello, I am text\n" * 20, "not an image"),
        "empty.png": (b"", "empty file"),
        "truncated.jpg": (encode(pattern(200, 200), "JPEG")[:600], "truncated or corrupt"),
        "big.png": (png_header(10000, 6000), "60.0 megapixels, over the limit of 50 megapixels"),
        "bomb.png": (png_header(20000, 20000), "20000x20000 is 400.0 megapixels, over the limit"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PhotoError, match=message):
            load_image(tmp_path / name)
    with pytest.raises(PhotoError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "loop_a.jpg").symlink_to(tmp_path / "loop_b.jpg")
    (tmp_path / "loop_b.jpg").symlink_to(tmp_path / "loop_a.jpg")
    with pytest.raises(PhotoError, match=r"loop_a.jpg: symbolic link loop$"):
        load_image(tmp_path / "loop_a.jpg")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(PhotoError, match=r"broken.jpg: broken symbolic link \(to .*gone.jpg"):
        load_image(tmp_path / "broken.jpg")
    with pytest.raises(PhotoError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(PhotoError, match="over the limit of 0.001"):
        load_image(encode(pattern(), "PNG"), max_pixels=1000)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(decode, "open", denied, raising=False)  # root may read anything
    (tmp_path / "locked.png").write_bytes(encode(pattern(), "PNG"))
    with pytest.raises(PhotoError, match="cannot be read .Permission denied"):
        load_image(tmp_path / "locked.png")


def _jpeg_header(w: int, h: int) -> bytes:
    """A small JPEG whose frame header (SOF) claims ``w`` x ``h`` pixels."""
    data = bytearray(encode(pattern(16, 16), "JPEG"))
    i = 2
    while data[i + 1] != 0xC0:  # walk the marker segments to the baseline frame header
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _over_limit(name, w, h, limit_mp) -> str:
    """The one message for every image over the pixel limit, whatever its size."""
    return re.escape(
        f"{name}: {w}x{h} is {w * h / 1e6:.1f} megapixels, over the limit of {limit_mp} "
        "megapixels (a decompression-bomb guard; raise it with --max-pixels)"
    )


@pytest.mark.parametrize("make", [png_header, _jpeg_header], ids=["png", "jpeg"])
def test_pixel_limit_has_one_message_at_any_size(tmp_path, make, lifted):
    """Headers over Pillow's own bomb limit (179 megapixels) get the project's message too:
    name, size, megapixels, the limit and how to raise it."""
    for w, h in ((12000, 9000), (60000, 60000)):
        path = tmp_path / f"big{w}.img"
        path.write_bytes(make(w, h))
        assert Image.open(path).size == (w, h)  # the crafted header reads as intended
        with pytest.raises(PhotoError, match=_over_limit(path, w, h, 50)):
            load_image(path)
        with pytest.raises(PhotoError, match=_over_limit("data", w, h, 100)):
            load_image(path.read_bytes(), max_pixels=100_000_000)
    with pytest.raises(PhotoError, match=_over_limit(path, 60000, 60000, 3000)):
        load_image(path, max_pixels=3_000_000_000)


def test_no_limit_and_large_limit_are_not_overruled_by_pillow(tmp_path, lifted):
    """max_pixels=0 (no limit) or 4e9 lets a 60000x60000 header through to decoding (it
    holds no pixels, so it then fails as truncated: nothing big is decoded)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(60000, 60000))
    for limit in (0, 4_000_000_000):
        with pytest.raises(PhotoError, match=r"bomb\.png: truncated or corrupt image") as e:
            load_image(path, max_pixels=limit)
        assert "limit" not in str(e.value).replace(str(tmp_path), "") and "\n" not in str(e.value)
    # a real image over a small limit: refused, and decoded when the limit is lifted
    big = tmp_path / "big.png"
    Image.fromarray(np.full((1500, 1000), 90, np.uint8)).save(big)
    with pytest.raises(PhotoError, match=_over_limit(big, 1000, 1500, 1)):
        extract_faces(big, detect=False, cfg=PhotoConfig(max_pixels=1_000_000))
    assert load_image(big, max_pixels=0).shape == (1500, 1000)
    (face,) = extract_faces(big, detect=False, cfg=PhotoConfig(max_pixels=0))
    assert face.box == (0, 0, 1000, 1500)


def test_a_program_keeps_pillows_guard_and_its_refusal_is_one_line(tmp_path, capsys):
    """Importing faceattrs leaves Pillow's process-wide guard as it was (a program's own
    image code keeps it); its refusal is one PhotoError naming the file; the command
    line lifts it while a command runs (--max-pixels is then the limit) and puts it back."""
    from faceattrs.cli import main

    default = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's own default
    assert Image.MAX_IMAGE_PIXELS == default
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(20000, 20000))  # 400 megapixels: over 2x Pillow's limit
    with pytest.raises(PhotoError, match="bomb.png: refused by Pillow's own pixel limit"):
        load_image(path, max_pixels=0)
    with photo.pillow_limit_lifted():
        with pytest.raises(PhotoError, match="bomb.png: truncated or corrupt"):
            load_image(path, max_pixels=0)
    assert Image.MAX_IMAGE_PIXELS == default
    rc = main(["predict", str(path), "--max-pixels", "0", "--out", str(tmp_path / "r.jsonl")])
    error = json.loads((tmp_path / "r.jsonl").read_text())["error"]
    assert "truncated or corrupt" in error and "Pillow" not in error, error
    assert rc == 1 and Image.MAX_IMAGE_PIXELS == default  # 1: a photo failed


def test_non_finite_float_arrays_are_refused(tmp_path):
    """NaN or inf pixels are refused (they used to become black or white silently)."""
    for fill in (np.nan, np.inf, -np.inf):
        with pytest.raises(PhotoError, match=r"^array: 2304 of 2304 pixels are NaN or infinite"):
            load_image(np.full((48, 48), fill, np.float32))
    rgb = np.full((4, 5, 3), 0.5)
    rgb[1, 2] = (np.nan, np.inf, 0.1)  # one pixel, counted once
    rgb[3, 4, 0] = np.nan
    with pytest.raises(PhotoError, match=r"^array: 2 of 20 pixels are NaN or infinite"):
        load_image(rgb)
    rgb[3, 4, 0] = 0.5
    with pytest.raises(PhotoError, match=r"^array: 1 of 20 pixels is NaN or infinite"):
        load_image(rgb)
    with pytest.raises(PhotoError, match="NaN or infinite"):  # the analyze(detect=False) path
        extract_faces(np.full((48, 48), np.nan, np.float32), detect=False)
    # a float ("F") TIFF with a NaN: refused, naming the file
    f = np.full((6, 7), 0.25, np.float32)
    f[2, 3] = np.nan
    path = tmp_path / "float.tif"
    Image.fromarray(f, mode="F").save(path)
    with pytest.raises(PhotoError, match=re.escape(f"{path}: 1 of 42 pixels is NaN")):
        load_image(path)
    f[2, 3] = 0.25
    Image.fromarray(f, mode="F").save(path)
    assert (load_image(path) == 64).all()  # finite floats still decode
