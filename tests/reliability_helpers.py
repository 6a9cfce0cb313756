"""Helpers of the reliability tests (tests/test_crash_consistency.py and
tests/test_bad_inputs.py): CSV files of random faces, face photos, and the check that a
command stops with one line and exit 2. The ``tiny_run`` fixture they share is in
conftest.py."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from faceattrs.cli import main

HEADER = "age,ethnicity,gender,img_name,pixels"


def pix(img: np.ndarray) -> str:
    return " ".join(map(str, img.ravel().tolist()))


def csv_of(path: Path, n: int, seed: int = 0, rows=()) -> Path:
    """``n`` distinct random faces with every class present, then ``rows`` as given."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 48, 48)).astype(np.uint8)
    lines = [HEADER]
    lines += [
        f"{20 + i % 50},{i % 5},{(i // 5) % 2},f{i}.jpg,{pix(im)}" for i, im in enumerate(imgs)
    ]
    lines += list(rows)
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def cli_logging():
    """Log records on stderr as the CLI shows them (INFO and up, the message alone): under
    pytest its ``logging.basicConfig`` does nothing (pytest's handlers are already there),
    so without this a warning printed before the error line would go unseen."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # capsys's stream, while it captures
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def one_line_error(capsys, argv, words: str) -> str:
    """Run the CLI: exit 2, exactly one non-empty line on stderr (no warning or traceback
    before it), naming ``words``."""
    with cli_logging():
        assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    (line,) = lines
    assert words in line and line.startswith(f"faceattrs {argv[0]}: error: "), line
    return line


def exactly_one_line(capsys, argv, words: str) -> str:
    """Exit 2 and exactly one line on stderr (no warning before it), naming ``words``."""
    with cli_logging():
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err and err.startswith(f"faceattrs {argv[0]}: error: "), err
    return err


def face_png(path: Path, seed: int = 0) -> Path:
    img = np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path
