"""Shared fixtures: paths to the real data in ../shared (skipped when absent) and small
synthetic face sets for logic tests."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
    return FaceSet.of(images, age, gender, ethnicity, sp, names)


@pytest.fixture
def tiny_faces():
    return synthetic_faceset()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder holding an untrained width-0.125 network as ``best`` (no training: a
    save), for the commands that need a model (test_crash_consistency, test_bad_inputs).
    Session-scoped: made once for both modules; the tests only read it."""
    from faceattrs.checkpoint import save_checkpoint
    from faceattrs.model import FaceResNet, ModelConfig

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    save_checkpoint(run, "best", FaceResNet(ModelConfig(width=0.125)), {"epoch": 0})
    return run


# ---------------------------------------------------------------- the prediction tests' inputs
# (test_predict_api.py, test_predict_cli.py, test_photo_workers.py; run_dir and photos also
# test_serve.py, test_distributed.py, test_bundle.py, test_layers.py). Session-scoped: the
# model is built once for all of them, so no test may write into these folders (copy first).
# A module that needs another model or other photos defines its own fixture of the same name.


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """predict_helpers.make_run's tiny random-init bundle (multitask model, age model,
    gender calibrated at temperature 2)."""
    from predict_helpers import make_run

    return make_run(tmp_path_factory.mktemp("run"), temperatures={"gender": 2.0})


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """The shared face photos (200x200 JPEGs), sorted; skipped when absent."""
    if not SHARED_PHOTOS.is_dir():
        pytest.skip(f"real photos not available: {SHARED_PHOTOS} is absent (outside the repo)")
    return sorted(SHARED_PHOTOS.glob("*.jpg"))


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> list:
    """Ten random images as files, one bad file, and two in-memory arrays (CI has no photos)."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    files = []
    for i in range(10):
        f = d / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (50 + 3 * i, 48, 3), dtype=np.uint8)).save(f)
        files.append(f)
    (d / "bad.jpg").write_text("not an image")
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    return [*files[:4], arrays[0], d / "bad.jpg", str(files[4]), *files[5:], arrays[1]]


def load_script(name: str):
    """Import ``tools/NAME.py`` or ``benchmarks/NAME.py`` as a module (not a package)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    path = next(p for d in ("tools", "benchmarks") if (p := root / d / f"{name}.py").exists())
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # as an import does (dataclasses look their module up there)
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


# ---------------------------------------------------------------- process trees (Linux /proc)


def descendants(pid: int) -> set[int]:
    """The pids of ``pid``'s children, their children and so on (read from Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # ended while we read
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def outliving(pids: set[int], seconds: float) -> list[int]:
    """The ``pids`` still running after ``seconds`` (polled); each of them is then killed,
    so that a failing test leaves no process behind."""
    deadline = time.monotonic() + seconds
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = sorted(p for p in pids if running(p))
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return left


def child_env() -> dict[str, str]:
    """The environment of a ``python -c`` child that imports this checkout's faceattrs."""
    import faceattrs

    env = dict(os.environ)
    src = str(Path(faceattrs.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def read_line(proc, seconds: float) -> str:
    """The next line of ``proc``'s stdout (text mode), or "" after ``seconds``."""
    import select

    if select.select([proc.stdout], [], [], seconds)[0]:
        return proc.stdout.readline()
    return ""
