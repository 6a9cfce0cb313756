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

from conftest import SHARED_PHOTOS  # ../shared/data/photos, or FACEATTRS_SHARED_DATA's


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from predict_helpers import make_run  # the same tiny bundle (multitask + age + calibration)

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
        "gender_agreement",
        "ethnicity_agreement",
        "age_bin_agreement",
    }
    for key, value in diffs.items():
        if key.endswith("_agreement"):
            assert value == 1.0, (key, value)
        else:
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
    with pytest.raises(FaceattrsError, match="run the export on onnxruntime"):
        FaceAnalyzer(export_dir)


def test_commands_that_need_pytorch_name_the_exports_run_folder(
    export_dir, run_dir, tmp_path, capsys
):
    from conftest import tiny_csv

    from faceattrs.cli import main

    data = str(tiny_csv(tmp_path))
    for cmd in (
        ["evaluate", "--data", data, "--split", "all", "--out", str(tmp_path / "e")],
        ["explain", "--data", data, "--misclassified", "Other", "--out", str(tmp_path / "x")],
    ):
        assert main([cmd[0], "--model", str(export_dir), *cmd[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--backend onnx;" in err, err
        assert f"pass the run folder it was exported from ({run_dir}" in err, err


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


@pytest.fixture(scope="module")
def csv(tmp_path_factory) -> Path:
    from conftest import tiny_csv

    return tiny_csv(tmp_path_factory.mktemp("csv"))


@pytest.fixture(scope="module")
def int8_dir(run_dir, csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "x"
    args = ["export", "--model", str(run_dir), "--out", str(out), "--int8", "--data", str(csv)]
    assert main([*args, "--calib-faces", "32"]) == 0
    return out


def test_int8_export_quantizes_and_records_its_calibration(int8_dir, export_dir):
    import onnx

    m = json.loads((int8_dir / MANIFEST).read_text())
    q = m["quantization"]
    assert q["precision"] == "int8" and q["calibration"]["split"] == "train"
    assert q["calibration"]["faces"] == 32 and q["calibration"]["check"] == "other training faces"
    for name in m["graphs"].values():
        ops = {n.op_type for n in onnx.load(str(int8_dir / name)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops, name
        # int8 weights: well under the fp32 graph's size
        assert (int8_dir / name).stat().st_size < 0.5 * (export_dir / name).stat().st_size
    assert {"gender_agreement", "ethnicity_agreement", "age_bin_agreement"} <= set(m["check"])
    assert m["check"]["faces"] > 0


def test_int8_export_runs_through_the_analyzer(run_dir, int8_dir):
    from faceattrs.bundle import resolve

    assert resolve(int8_dir).precision == "int8" and resolve(run_dir).precision == "fp32"
    faces = np.random.default_rng(3).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    int8 = FaceAnalyzer(int8_dir, backend="onnx", dtype="int8").analyze(list(faces), detect=False)
    fp32 = FaceAnalyzer(run_dir).analyze(list(faces), detect=False)
    assert len(int8) == len(fp32) == 5
    for a, b in zip(int8, fp32, strict=True):
        assert set(a["gender"]["probabilities"]) == set(b["gender"]["probabilities"])
        assert abs(sum(a["ethnicity"]["probabilities"].values()) - 1) < 1e-3
        assert set(a["age"]) == set(b["age"]) and a["age"]["bin"] in b["age"]["bin_probabilities"]
    # what agreement() measures on the same faces (the random-init network's logits are
    # near ties, so only the form is checked here; real faces: test_default_model.py)
    diffs = agreement(TorchModels(run_dir), OnnxModels(int8_dir), faces)
    assert all(0 <= diffs[f"{h}_agreement"] <= 1 for h in ("gender", "ethnicity", "age_bin"))


def test_int8_options_are_one_clear_error(run_dir, export_dir, int8_dir, tmp_path, capsys):
    face = tmp_path / "face.png"
    import cv2

    cv2.imwrite(str(face), np.full((48, 48), 128, np.uint8))
    cases = [
        (["export", "--model", str(run_dir), "--out", str(tmp_path / "a"), "--int8"],
         "records no data path"),  # the tiny run records no data
        (["export", "--model", str(run_dir), "--out", str(tmp_path / "b"), "--data", "x.csv"],
         "belong to --int8"),
        (["export", "--model", str(run_dir), "--out", str(tmp_path / "c"), "--int8",
          "--data", "x.csv", "--calib-faces", "3"], "at least 16"),
        (["export", "--model", str(run_dir), "--out", str(tmp_path / "d"), "--int8",
          "--data", "x.csv", "--seed", "-1"], "--seed must be at least 0"),
        (["predict", str(face), "--no-detect", "--dtype", "int8", "--backend", "torch"],
         "leave out --backend torch"),
        (["predict", str(face), "--no-detect", "--dtype", "int8", "--model", str(export_dir)],
         "is not an int8 export"),
        (["predict", str(face), "--no-detect", "--dtype", "int8", "--model", str(run_dir)],
         "is not an int8 export"),
        (["predict", str(face), "--no-detect", "--backend", "onnx", "--dtype", "bf16"],
         "fp32 or int8"),
    ]  # fmt: skip
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # an int8 export runs from the command line, with --backend onnx implied
    assert (
        main(["predict", str(face), "--no-detect", "--dtype", "int8", "--model", str(int8_dir)])
        == 0
    )
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    assert rec["gender"]["label"] in ("Male", "Female")


def test_a_lone_call_runs_on_every_core_with_the_same_answers(export_dir, monkeypatch):
    """With a pool (one photo: the analyzer's other streams idle) the graph runs on a session
    with every core; the answers are the stream session's."""
    import faceattrs.backends as B

    monkeypatch.setattr(B, "cpu_cores", lambda: 2)
    b = OnnxModels(export_dir, threads=1)
    faces = np.random.default_rng(4).integers(0, 256, (1, 48, 48), dtype=np.uint8)
    (lo, ao), (lw, aw) = b.outputs(faces), b.outputs(faces, pool=object())
    assert b._wide is not None and b._wide is not b.multitask
    for h in lo:
        np.testing.assert_allclose(lo[h], lw[h], atol=1e-5)
    np.testing.assert_allclose(ao["value"], aw["value"], atol=1e-4)
    monkeypatch.setattr(B, "cpu_cores", lambda: 1)  # one core: nothing to widen
    one = OnnxModels(export_dir, threads=1)
    one.outputs(faces, pool=object())
    assert one._wide is None


def test_an_exports_age_model_evaluates_as_the_pytorch_one(run_dir, export_dir):
    """OnnxAgeModel (what `evaluate --dtype int8` reads) gives predict_all's outputs."""
    from faceattrs.backends import OnnxAgeModel

    faces = np.random.default_rng(6).integers(0, 256, (9, 48, 48), dtype=np.uint8)
    torch_age = TorchModels(run_dir).age_model
    onnx_age = OnnxAgeModel(OnnxModels(export_dir), batch_size=4)  # several batches
    a, b = torch_age.predict_all(faces), onnx_age.predict_all(faces)
    assert set(b) == set(a) - {"embedding"}
    for k in b:
        np.testing.assert_allclose(a[k], b[k], atol=2e-3, err_msg=k)
    for k in ("edges", "clip"):
        np.testing.assert_allclose(getattr(onnx_age, k), getattr(torch_age, k), err_msg=k)
    for k in ("bin_labels", "routing", "approach", "interval"):
        assert getattr(onnx_age, k) == getattr(torch_age, k), k


def test_evaluate_int8_writes_the_metrics_of_the_export(int8_dir, csv, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["evaluate", "--model", str(int8_dir), "--dtype", "int8", "--data", str(csv)]
    assert main([*argv, "--split", "val", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["precision"] == "int8" and m["model"] == str(int8_dir) and m["n"] > 0
    assert m["age"]["mae_hard"] is not None and m["age"]["direct"] is not None  # both kinds
    assert (out / "age" / "age_metrics.json").exists() and (out / "confusion_gender.png").exists()
    capsys.readouterr()
    for extra, message in (
        (["--device", "cuda"], "runs on the CPU"),
        (["--model", str(tmp_path)], "not a model folder"),
    ):
        bad = ["evaluate", "--dtype", "int8", "--data", str(csv), "--model", str(int8_dir)]
        assert main([*bad, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["evaluate", "--dtype", "int8", "--model", str(int8_dir)]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_evaluate_a_run_calibrated_on_one_head_only(run_dir, csv, tmp_path):
    """The tiny run has a temperature for ethnicity alone: each head's reliability figure
    shows the calibrated curve only where there is one (this crashed before)."""
    out = tmp_path / "ev"
    argv = ["evaluate", "--model", str(run_dir), "--data", str(csv), "--split", "val"]
    assert main([*argv, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "ece_calibrated" in m["ethnicity"] and "ece_calibrated" not in m["gender"]
