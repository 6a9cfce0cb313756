"""The bundle layer: every kind of --model resolves to one typed object, and every broken
model folder is one clear line and exit 2 (no traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import faceattrs
from faceattrs import bundle as B
from faceattrs import run_folder
from faceattrs.checkpoint import CheckpointError
from faceattrs.cli import main
from faceattrs.exceptions import FaceattrsError
from faceattrs.inputs import ETHNICITIES, GENDERS
from faceattrs.predict import FaceAnalyzer


@pytest.fixture
def run(run_dir) -> Path:
    """conftest's session bundle (gender calibrated at 2): read, or copied before a change."""
    return run_dir


@pytest.fixture
def face(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48), np.uint8)).save(path)
    return path


def test_every_kind_resolves_to_one_bundle(run):
    b = B.resolve(run)
    assert (b.kind, b.run_dir, b.age_dir) == ("run", run, run / "age")
    assert b.heads == {"gender": list(GENDERS), "ethnicity": list(ETHNICITIES)}
    assert b.temperatures == {"gender": 2.0}
    # make_run's age model keeps AgeModel's default approach and routing
    assert b.bin_labels[-1] == "53+" and (b.age["approach"], b.age["routing"]) == (
        "two_stage",
        "soft",
    )
    # the age run names the same bundle, found through the path it records
    a = B.resolve(run / "age")
    assert (a.run_dir, a.age_dir, a.temperatures) == (run.resolve(), run / "age", b.temperatures)
    # a checkpoint file is that network alone
    c = B.resolve(run / "best.safetensors")
    assert (c.kind, c.age_dir, c.checkpoint) == ("checkpoint", None, run / "best.json")
    model, meta = c.load_multitask()
    assert list(model.cfg.heads) == list(c.heads) and meta["epoch"] == 0
    assert B.resolve(b) is b  # a resolved bundle passes through, to the API too
    face = np.full((48, 48), 128, np.uint8)
    assert FaceAnalyzer(b).analyze(face, detect=False)[0]["age"] is not None
    assert faceattrs.analyze(face, b, detect=False)[0]["gender"]["label"] in GENDERS


def test_default_model_is_the_packaged_folder(run, monkeypatch, tmp_path):
    monkeypatch.setattr(B, "DEFAULT_MODEL_DIR", run)
    assert B.resolve(None).path == run
    monkeypatch.setattr(B, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(FaceattrsError, match="no default model is bundled"):
        B.resolve(None)


def test_bundled_models_by_name(run, monkeypatch, tmp_path):
    """``--model utk48`` is a model shipped in the package, unless a folder of that name is
    where the command runs; an installation without it says so in one line."""
    monkeypatch.setitem(B.NAMED_MODELS, "utk48", run)
    monkeypatch.chdir(tmp_path)
    assert B.resolve("utk48").path == run and B.is_bundled_name("utk48")
    own = tmp_path / "utk48"
    own.mkdir()
    with pytest.raises(FaceattrsError, match="not a model folder"):  # the local folder wins
        B.resolve("utk48")
    assert not B.is_bundled_name("utk48")
    own.rmdir()
    monkeypatch.setitem(B.NAMED_MODELS, "utk48", tmp_path / "absent")
    monkeypatch.setitem(B.NAMED_INT8, "utk48", tmp_path / "absent")
    with pytest.raises(FaceattrsError, match="bundled model 'utk48' is not in this installation"):
        B.resolve("utk48")
    with pytest.raises(FaceattrsError, match="not in this installation"):
        B.default_int8("utk48")


def _cli_error(capsys, args) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr, no traceback."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "name", ["best.safetensors", "age/coarse.safetensors", "age/regressors.safetensors"]
)
@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_weights_are_one_line(run, tmp_path, face, capsys, name, damage):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    target = copy / name
    data = target.read_bytes()
    rng = np.random.default_rng(1)
    target.write_bytes(data[: len(data) // 2] if damage == "truncated" else rng.bytes(len(data)))
    with pytest.raises(CheckpointError, match=Path(name).name):
        FaceAnalyzer(copy)
    err = _cli_error(capsys, ["predict", str(face), "--model", str(copy), "--no-detect"])
    assert Path(name).name in err and "faceattrs predict: error:" in err


def test_best_json_that_is_a_list_is_one_line(run, tmp_path, face, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "best.json").write_text(json.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError, match="not a JSON object"):
        B.resolve(copy)
    err = _cli_error(capsys, ["predict", str(face), "--model", str(copy), "--no-detect"])
    assert "best.json" in err
    # the same for the age settings and an ONNX manifest
    shutil.rmtree(copy)
    shutil.copytree(run, copy)
    (copy / "age" / "age.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"not a JSON object: .*age\.json holds a list"):
        B.resolve(copy)
    err = _cli_error(capsys, ["predict", str(face), "--model", str(copy), "--no-detect"])
    assert "age.json holds a list" in err
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    from faceattrs.export import export_onnx

    export = tmp_path / "onnx"
    manifest = export_onnx(run, export)
    assert manifest == export / B.ONNX_MANIFEST and B.resolve(export).kind == "onnx"
    manifest.write_text("[]")
    with pytest.raises(CheckpointError, match=r"faceattrs-onnx\.json: not a JSON object"):
        B.resolve(export)
    err = _cli_error(capsys, ["predict", str(face), "--model", str(export), "--no-detect"])
    assert "faceattrs-onnx.json" in err and "not a JSON object" in err


def test_copied_age_run_uses_its_relative_multitask_run_or_fails(run, tmp_path, face, capsys):
    """age.json records the multitask run relative to the age run (and, for information,
    the absolute path at training); a copy alone must not silently load the original."""
    lone = tmp_path / "elsewhere" / "age"
    shutil.copytree(run / "age", lone)
    recorded = json.loads((lone / "age.json").read_text())
    assert Path(recorded["multitask_absolute"]) == run.resolve()  # still there
    with pytest.raises(CheckpointError, match="multitask model is missing") as e:
        B.resolve(lone)
    assert str(run.resolve()) in str(e.value)  # the message says where it was at training
    err = _cli_error(capsys, ["predict", str(face), "--model", str(lone), "--no-detect"])
    assert "copy the age run together with its multitask run" in err
    # copied together, keeping their relative places: the copy is used, not the original
    both = tmp_path / "both"
    shutil.copytree(run, both)
    b = B.resolve(both / "age")
    assert b.run_dir == both.resolve() and b.checkpoint == both.resolve() / "best.json"
    recs = FaceAnalyzer(both / "age").analyze(str(face), detect=False)
    assert recs[0]["age"] is not None


def test_damaged_weights_with_a_fitted_calibration_are_one_line(run, tmp_path, face, capsys):
    """The calibration's weights check must not warn about "other weights" first."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cal = {"temperatures": {"gender": 2.0}, "weights_sha256": run_folder.weights_id(copy)}
    (copy / "calibration.json").write_text(json.dumps(cal))
    data = (copy / "best.safetensors").read_bytes()
    (copy / "best.safetensors").write_bytes(data[: len(data) // 2])
    err = _cli_error(capsys, ["predict", str(face), "--model", str(copy), "--no-detect"])
    assert "best.safetensors: not a readable safetensors file" in err


@pytest.mark.parametrize("t", [-1.0, 0.0, float("nan"), float("inf")])
def test_temperatures_must_be_positive_numbers(run, tmp_path, face, capsys, t):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "calibration.json").write_text(json.dumps({"temperatures": {"gender": t}}))
    with pytest.raises(FaceattrsError, match="temperatures must be positive numbers"):
        B.resolve(copy)
    err = _cli_error(capsys, ["predict", str(face), "--model", str(copy), "--no-detect"])
    assert "calibration.json is not a calibration file" in err


@pytest.mark.parametrize(
    "change, words",
    [
        ({"edges": [30, 17]}, "age edges must increase and clip be (low, high)"),
        ({"clip": [100, 1]}, "age edges must increase and clip be (low, high)"),
        ({"edges": []}, "age edges must increase and clip be (low, high)"),
        ({"clip": "x"}, "bad or missing age edges / clip"),
    ],
)
def test_age_settings_out_of_order_are_one_line(run, tmp_path, face, capsys, change, words):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "age" / "age.json").read_text())
    (copy / "age" / "age.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(CheckpointError) as e:
        B.resolve(copy)
    assert words in str(e.value) and "age.json" in str(e.value)
    err = _cli_error(capsys, ["predict", str(face), "--model", str(copy), "--no-detect"])
    assert "age.json" in err and words in err


@pytest.mark.parametrize(
    "change, words",
    [
        ({"format": "faceattrs-checkpoint-99"}, "checkpoint format"),
        ({"image_size": 64}, "64-pixel faces"),
        ({"normalisation": {"mean": 0.5, "std": 0}}, "input normalisation"),
    ],
)
def test_checkpoint_settings_this_code_cannot_honour_are_one_line(
    run, tmp_path, face, capsys, change, words
):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "best.json").read_text())
    (copy / "best.json").write_text(json.dumps({**meta, **change}))
    assert words in _cli_error(capsys, ["predict", str(face), "--model", str(copy), "--no-detect"])
