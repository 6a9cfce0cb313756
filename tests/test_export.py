"""ONNX export and the onnxruntime backend agree with PyTorch on real faces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from faceattrs.backends import OnnxBackend as OnnxModels
from faceattrs.backends import TorchBackend as TorchModels
from faceattrs.checkpoint import CheckpointError
from faceattrs.cli import main
from faceattrs.exceptions import FaceattrsError
from faceattrs.export import MANIFEST, agreement, export_onnx
from faceattrs.photo import extract_faces, load_image
from faceattrs.predict import FaceAnalyzer

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from test_predict import make_run  # the same tiny bundle (multitask + age + calibration)

    return make_run(tmp_path_factory.mktemp("run"), temperatures={"ethnicity": 1.7})


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    main(["export", "--model", str(run_dir), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    if not SHARED_PHOTOS.is_dir():
        pytest.skip(f"real photos not available: {SHARED_PHOTOS} is absent (outside the repo)")
    return np.stack(
        [extract_faces(load_image(p))[0].crop for p in sorted(SHARED_PHOTOS.glob("*.jpg"))]
    )


def test_export_writes_graphs_and_manifest(export_dir):
    m = json.loads((export_dir / MANIFEST).read_text())
    assert set(m["graphs"]) == {"multitask", "age_two_stage", "age_direct"}
    assert all((export_dir / g).stat().st_size > 1000 for g in m["graphs"].values())
    assert m["temperatures"] == {"ethnicity": 1.7} and m["age"]["bin_labels"][-1] == "53+"
    assert max(v for k, v in m["check"].items() if k.endswith("probabilities")) <= 1e-3


def test_onnxruntime_agrees_with_pytorch_on_real_faces(run_dir, export_dir, faces):
    diffs = agreement(TorchModels(run_dir), OnnxModels(export_dir), faces)
    assert set(diffs) == {
        "gender_probabilities",
        "gender_logits",
        "ethnicity_probabilities",
        "ethnicity_logits",
        "age_bin_probabilities",
        "age_years",
    }
    for key, value in diffs.items():
        assert value <= (1e-2 if key == "age_years" else 1e-3), (key, value)


def test_dynamic_batch(export_dir, faces):
    models = OnnxModels(export_dir)
    whole = models.logits(faces)["ethnicity"]
    parts = np.concatenate(
        [models.logits(faces[i : i + 5])["ethnicity"] for i in range(0, len(faces), 5)]
    )
    assert whole.shape == (len(faces), 5) and np.allclose(whole, parts, atol=1e-5)
    assert models.logits(faces[:1])["gender"].shape == (1, 2)


def test_direct_age_approach_matches(run_dir, export_dir, faces):
    tm, om = TorchModels(run_dir), OnnxModels(export_dir)
    tm.age_model.approach = "direct"
    om.age_meta = {**om.age_meta, "approach": "direct"}
    a, b = tm.age(faces), om.age(faces)
    assert np.abs(a["bin_probabilities"] - b["bin_probabilities"]).max() <= 1e-3
    assert np.abs(a["value"] - b["value"]).max() <= 1e-2


def test_predict_with_onnx_backend_matches_torch(run_dir, export_dir, tmp_path):
    photos = sorted(SHARED_PHOTOS.glob("*.jpg"))[:6]
    if not photos:
        pytest.skip("real photos not available")
    out = tmp_path / "onnx.jsonl"
    rc = main(
        [
            "predict",
            *map(str, photos),
            "--model",
            str(export_dir),
            "--backend",
            "onnx",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    onnx_recs = [json.loads(line) for line in out.read_text().splitlines()]
    torch_recs = FaceAnalyzer(run_dir).analyze(photos)
    assert len(onnx_recs) == len(torch_recs) == 6
    for a, b in zip(onnx_recs, torch_recs, strict=True):
        assert a["box"] == b["box"] and a["gender"]["label"] == b["gender"]["label"]
        for head in ("gender", "ethnicity"):
            pa, pb = a[head]["probabilities"], b[head]["probabilities"]
            assert max(abs(pa[k] - pb[k]) for k in pa) <= 1e-3
    # a run folder works too (exported on the fly), and an export is refused by the torch backend
    assert FaceAnalyzer(run_dir, backend="onnx").analyze(photos[0])[0]["age"] == onnx_recs[0]["age"]
    with pytest.raises(FaceattrsError, match="use it with --backend onnx"):
        FaceAnalyzer(export_dir)


def test_export_errors(tmp_path, export_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_onnx(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(FaceattrsError, match="already an ONNX export"):
        export_onnx(export_dir, tmp_path / "out")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / MANIFEST).write_text("{")
    with pytest.raises(CheckpointError, match="unreadable ONNX manifest"):
        OnnxModels(tmp_path / "broken")


def test_export_replaces_a_former_export_whole_and_never_a_run(tmp_path, run_dir, monkeypatch):
    import faceattrs.export as E

    out = tmp_path / "onnx"
    export_onnx(run_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class Killed(BaseException):
        pass

    def killed(*a, **k):
        raise Killed

    # killed after the new graphs and manifest are written, before the swap: the old
    # export stays whole and no staging folder is left
    monkeypatch.setattr(E, "agreement", killed)
    with pytest.raises(Killed):
        export_onnx(run_dir, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    monkeypatch.undo()
    # a staging folder of a killed process is removed by the next export
    (tmp_path / ".onnx.999999999.tmpabcdefgh").mkdir()
    export_onnx(run_dir, out, opset=18)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    assert json.loads((out / MANIFEST).read_text())["opset"] == 18
    # a run folder (or any folder with other files) is never replaced by an export
    with pytest.raises(FaceattrsError, match="holds other files than a former export"):
        export_onnx(run_dir, run_dir)
    assert (run_dir / "best.safetensors").exists()
    with pytest.raises(FaceattrsError, match="--opset must be in"):
        export_onnx(run_dir, tmp_path / "x", opset=9)


def test_damaged_graph_is_one_clear_error(tmp_path, export_dir):
    import shutil

    copy = tmp_path / "onnx"
    shutil.copytree(export_dir, copy)
    (copy / "multitask.onnx").write_bytes((export_dir / "multitask.onnx").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a loadable ONNX graph"):
        OnnxModels(copy)
