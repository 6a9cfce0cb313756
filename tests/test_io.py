"""Atomic writes: nothing half-written, shared permissions, checkpoints included."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from faceattrs import io
from faceattrs.checkpoint import save_checkpoint
from faceattrs.model import FaceResNet, ModelConfig


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_umask_mode_not_mkstemps_0600(tmp_path, monkeypatch):
    # the umask read at import, set to one that differs both from mkstemp's 0600 and from
    # what the process's real umask gives a freshly created file (0644 under 022, 0600
    # under 077): only the chmod makes 0664, whatever umask the tests run under
    monkeypatch.setattr(io, "_UMASK", 0o002)
    io.write_json_atomic(tmp_path / "a.json", {"x": 1})
    save_checkpoint(tmp_path, "best", FaceResNet(ModelConfig(width=0.125)), {"epoch": 0})
    assert mode(tmp_path / "a.json") == 0o664
    assert mode(tmp_path / "best.safetensors") == 0o664
    assert mode(tmp_path / "best.json") == 0o664
    with io.atomic_folder(tmp_path / "folder") as stage:  # mkdtemp makes 0700
        (stage / "x").write_text("1")
    assert mode(tmp_path / "folder") == 0o775


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "r.json"
    io.write_json_atomic(target, {"v": 1})

    def boom(p):
        p.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.write_with(target, boom)
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_write_errors_name_the_file_not_the_temporary_one(tmp_path, monkeypatch):
    from faceattrs import io as fio

    target = tmp_path / "r.json"

    def refused(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".r.json.1.tmpabcdefgh.json"))

    monkeypatch.setattr(fio.tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as e:
        fio.write_json_atomic(target, {})
    assert e.value.filename == str(target)
    monkeypatch.undo()

    def failing_writer(tmp):
        raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(OSError) as e:
        fio.write_with(target, failing_writer)
    assert e.value.filename == str(target) and e.value.errno == 28
    assert list(tmp_path.iterdir()) == []


def renameat2_swaps(folder: Path) -> bool:
    """Whether this system and file system swap two folders in one step (Linux
    ``renameat2(RENAME_EXCHANGE)``), tried here independently of ``io._exchange``."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    a, b = folder / "probe_a", folder / "probe_b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").touch()
    ok = fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0 and (b / "from_a").exists()
    for d in (a, b):
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    return ok


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_folder_replaces_whole_or_keeps_the_old(tmp_path, monkeypatch, exchange):
    from faceattrs import io as fio

    swaps = []  # what each call of the atomic swap answered
    if exchange:
        real_exchange = fio._exchange

        def spy(a, b):
            swaps.append(real_exchange(a, b))
            return swaps[-1]

        monkeypatch.setattr(fio, "_exchange", spy)
    else:  # the fallback of systems without an atomic swap
        monkeypatch.setattr(fio, "_exchange", lambda a, b: swaps.append(False) or False)
    target = tmp_path / "out"
    with fio.atomic_folder(target) as stage:
        (stage / "a").write_text("1")
    with pytest.raises(RuntimeError), fio.atomic_folder(target) as stage:
        (stage / "b").write_text("2")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in target.iterdir()] == ["a"]
    if not exchange:  # the new folder cannot be moved in: the old one is put back
        real = os.rename

        def second_fails(src, dst):
            if Path(dst) == target and Path(src).name.startswith(".out."):
                raise OSError(5, "I/O error")
            return real(src, dst)

        monkeypatch.setattr(fio.os, "rename", second_fails)
        with pytest.raises(OSError), fio.atomic_folder(target) as stage:
            (stage / "c").write_text("3")
        monkeypatch.setattr(fio.os, "rename", real)
        assert [p.name for p in target.iterdir()] == ["a"]
    swaps.clear()
    with fio.atomic_folder(target) as stage:
        (stage / "d").write_text("4")
    assert [p.name for p in target.iterdir()] == ["d"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left
    assert len(swaps) == 1  # a full folder was there: the swap was tried, once
    if exchange:
        if not renameat2_swaps(tmp_path):
            pytest.skip("renameat2(RENAME_EXCHANGE) is not available here: the fallback ran")
        assert swaps == [True]  # the folder was swapped in one step, not moved aside


def test_json_files_have_null_not_nan(tmp_path):
    from faceattrs.age.conformal import coverage
    from faceattrs.io import write_json_atomic

    empty = coverage(np.array([]), np.array([]), np.array([]))  # an age bin with no face
    assert empty == {"coverage": None, "mean_width": None, "n": 0}
    obj = {
        "bin": empty,
        "nan": float("nan"),
        "x": [np.float32("nan"), 1.5],
        "a": np.array([np.nan]),
    }
    write_json_atomic(tmp_path / "m.json", obj)

    def refuse(word):
        raise ValueError(f"not strict JSON: {word}")

    back = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)
    assert back == {"bin": empty, "nan": None, "x": [None, 1.5], "a": [None]}
    # an infinity keeps its meaning (an unbounded interval), as Python's json writes it
    write_json_atomic(tmp_path / "i.json", {"half_width": float("inf")})
    assert json.loads((tmp_path / "i.json").read_text()) == {"half_width": float("inf")}
