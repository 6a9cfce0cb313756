"""tools/package_default_model.py and tools/package_int8_model.py on a tiny run, into a
temporary folder: what they write, that it loads, and that a failure while building leaves
the former folder whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_script, tiny_csv

from faceattrs.predict import FaceAnalyzer


@pytest.fixture
def packaged(tmp_path, monkeypatch):
    from predict_helpers import make_run

    pdm = load_script("package_default_model")
    run = make_run(tmp_path / "run", temperatures={"gender": 2.0})
    (run / "config.json").write_text(json.dumps({"data": "/elsewhere/faces.csv", "seed": 0}))
    csv = tiny_csv(tmp_path)
    dest = tmp_path / "pkg" / "default_model"
    monkeypatch.setattr(pdm, "DEST", dest)
    argv = ["--run", str(run), "--data", str(csv), "--csv", str(csv), "--check-n", "8"]
    return pdm, argv, dest, csv


def test_package_default_model_writes_a_self_contained_folder(packaged):
    pdm, argv, dest, csv = packaged
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("from an older model")
    assert pdm.main(argv) == 0
    names = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert "stale.txt" not in names  # replaced whole, not merged
    assert {"best.safetensors", "calibration.json", "provenance.json", "age/age.json"} <= names
    age = json.loads((dest / "age" / "age.json").read_text())
    assert age["multitask"] == ".." and "multitask_absolute" not in age
    assert json.loads((dest / "config.json").read_text())["data"] == csv.name  # no local path
    prov = json.loads((dest / "provenance.json").read_text())
    assert "non-commercial" in prov["licence"] and prov["check"]["first_n"] == 8
    face = np.full((48, 48), 120, np.uint8)
    assert FaceAnalyzer(dest).analyze(face, detect=False)[0]["age"] is not None


def test_a_failed_packaging_leaves_the_former_model_whole(packaged, monkeypatch):
    pdm, argv, dest, _ = packaged
    assert pdm.main(argv) == 0
    before = {p.name: p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    def boom(*_, **__):
        raise RuntimeError("killed while checking")

    monkeypatch.setattr(pdm, "check_figures", boom)
    with pytest.raises(RuntimeError, match="killed"):
        pdm.main(argv)
    assert {p.name: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert [p.name for p in dest.parent.iterdir()] == ["default_model"]  # no staging left


def test_package_int8_model_quantizes_the_packaged_model(packaged, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    import faceattrs.bundle as B

    pdm, argv, dest, csv = packaged
    assert pdm.main(argv) == 0
    int8_dir = dest.with_name("default_model_int8")
    monkeypatch.setattr(B, "DEFAULT_MODEL_DIR", dest)
    monkeypatch.setattr(B, "DEFAULT_INT8_DIR", int8_dir)
    pim = load_script("package_int8_model")
    assert pim.main(["--data", str(csv), "--calib-faces", "32", "--check-n", "8"]) == 0
    b = B.default_int8()
    assert b.precision == "int8" and b.source.resolve() == dest.resolve()
    calib = b.meta["quantization"]["calibration"]
    assert calib["split"] == "train" and calib["faces"] == 32 and calib["data"] == csv.name
    prov = json.loads((int8_dir / "provenance.json").read_text())
    assert "non-commercial" in prov["licence"] and prov["check"]["first_n"] == 8
    face = np.full((48, 48), 120, np.uint8)
    rec = FaceAnalyzer(backend="onnx", dtype="int8").analyze(face, detect=False)[0]
    assert rec["gender"]["label"] in ("Male", "Female")
