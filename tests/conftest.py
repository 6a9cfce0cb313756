"""Shared fixtures: paths to the real data in ../shared (skipped when absent) and small
synthetic face sets for logic tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; FACEATTRS_SHARED_DATA points elsewhere (a worktree)
SHARED = Path(os.environ.get("FACEATTRS_SHARED_DATA") or REPO.parent / "shared" / "data")
SHARED_CSV = SHARED / "utkface48.csv.gz"
SHARED_PHOTOS = SHARED / "photos"

# Test models are tiny: one thread beats two, and two crawl when other jobs share the cores.
torch.set_num_threads(1)


@pytest.fixture
def shared_csv() -> Path:
    if not SHARED_CSV.exists():
        pytest.skip(f"real data not available: {SHARED_CSV} is absent (it lives outside the repo)")
    return SHARED_CSV


@pytest.fixture
def shared_photos() -> Path:
    if not SHARED_PHOTOS.is_dir():
        pytest.skip(f"real photos not available: {SHARED_PHOTOS} is absent (outside the repo)")
    return SHARED_PHOTOS


def synthetic_faceset(n: int = 60, seed: int = 0, split: bool = True):
    """A small random :class:`FaceSet` with every class present and a 80/10/10-ish split."""
    from faceattrs.dataset import FaceSet

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 48, 48), dtype=np.uint8)
    ethnicity = (np.arange(n) % 5).astype(np.int8)
    gender = ((np.arange(n) // 5) % 2).astype(np.int8)
    age = rng.integers(1, 90, size=n).astype(np.int16)
    sp = np.zeros(n, np.int8)
    if split:
        sp[np.arange(n) % 10 == 8] = 1
        sp[np.arange(n) % 10 == 9] = 2
    else:
        sp[:] = -1
    names = np.array([f"img{i}.jpg" for i in range(n)])
    return FaceSet(images, age, gender, ethnicity, sp, names)


@pytest.fixture
def tiny_faces():
    return synthetic_faceset()


def load_script(name: str):
    """Import ``tools/NAME.py`` or ``benchmarks/NAME.py`` as a module (not a package)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    path = next(p for d in ("tools", "benchmarks") if (p := root / d / f"{name}.py").exists())
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_csv(tmp_path) -> Path:
    """A 120-row CSV in the public layout (random pixels, every class present)."""
    rng = np.random.default_rng(0)
    n = 120
    lines = ["age,ethnicity,gender,img_name,pixels"]
    for i in range(n):
        pix = " ".join(map(str, rng.integers(0, 256, 2304).tolist()))
        lines.append(f"{int(rng.integers(1, 90))},{i % 5},{(i // 5) % 2},f{i}.jpg,{pix}")
    csv = tmp_path / "faces.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv
