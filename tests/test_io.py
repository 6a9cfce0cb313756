"""Atomic writes: nothing half-written, shared permissions, checkpoints included."""

import os
import stat

import pytest

from faceattrs import io
from faceattrs.checkpoint import save_checkpoint
from faceattrs.model import FaceResNet, ModelConfig


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    expected = 0o666 & ~io._UMASK
    io.write_json_atomic(tmp_path / "a.json", {"x": 1})
    save_checkpoint(tmp_path, "best", FaceResNet(ModelConfig(width=0.125)), {"epoch": 0})
    assert mode(tmp_path / "a.json") == expected
    assert mode(tmp_path / "best.safetensors") == expected
    assert mode(tmp_path / "best.json") == expected


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
