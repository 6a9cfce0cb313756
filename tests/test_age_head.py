"""A multitask network with its own age head (gender, ethnicity, age in one network): the
bundle's age model is that head, run in the same pass, on every backend."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_faceset

from faceattrs import bundle as B
from faceattrs.backends import TorchBackend
from faceattrs.calibrate import calibrate_run
from faceattrs.checkpoint import CheckpointError, save_checkpoint
from faceattrs.cli import main
from faceattrs.model import FaceResNet, ModelConfig
from faceattrs.postprocess import age_prediction
from faceattrs.predict import FaceAnalyzer

HEADS = {"gender": 2, "ethnicity": 5, "age": 117}


@pytest.fixture(scope="module")
def faces():
    return synthetic_faceset(120, seed=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory, faces) -> Path:
    torch.manual_seed(0)
    net = FaceResNet(ModelConfig(width=0.125, heads=HEADS)).eval()
    for m in net.modules():  # non-trivial BatchNorm statistics, so fusing is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    run = tmp_path_factory.mktemp("head") / "run"
    run.mkdir()
    save_checkpoint(run, "best", net, {"epoch": 3, "age_edges": [17, 26, 30, 38, 54]})
    calibrate_run(run, faces, flip_tta="on")
    return run


def test_calibrate_writes_the_age_model_of_the_head(run, faces):
    meta = json.loads((run / "age" / "age.json").read_text())
    assert meta["direct"] == "multitask" and meta["approach"] == "direct"
    assert meta["edges"] == [17, 26, 30, 38, 54] and meta["flip_tta"] is True
    assert len(meta["interval"]["per_bin"]) == 6 and meta["interval"]["fitted_on"] == "val"
    assert not (run / "age" / "coarse.json").exists()  # no second network
    b = B.resolve(run)
    assert list(b.heads) == ["gender", "ethnicity"]  # the age head is no class head
    assert b.shared_age and b.age_head and b.flip_tta and set(b.temperatures) == set(b.heads)
    # the interval is the split-conformal fit to the predictions the bundle makes on val
    val = faces.subset("val")
    age = TorchBackend(b).age(val.images)
    from faceattrs.age import conformal

    refit = conformal.fit(val.age, age["value"], age["bin"], 6)
    assert refit["per_bin"] == pytest.approx(meta["interval"]["per_bin"], abs=1e-3)


def test_one_pass_serves_every_head(run, faces):
    backend = TorchBackend(run)
    calls = []
    backend.model.register_forward_hook(lambda *a: calls.append(1))
    logits, age = backend.outputs(faces.images[:7])
    assert len(calls) == 1 and set(logits) == {"gender", "ethnicity"}
    # the same numbers as the age model alone (its own pass, mirrored as calibrated)
    alone = B.resolve(run).load_age()
    assert alone.shared and alone.flip_tta and alone.coarse is None
    want = alone.predict(faces.images[:7])
    np.testing.assert_allclose(age["value"], want["value"], atol=1e-3)
    np.testing.assert_allclose(age["interval"][0], want["interval"][0], atol=1e-3)
    # and as the network's logits put through the direct head's post-processing
    net, _ = B.resolve(run).load_multitask()
    with torch.no_grad():
        years = net(torch.from_numpy(faces.images[:7]).float().div(255).sub(0.5).div(0.5)[:, None])
    direct = age_prediction(
        "direct",
        year_logits=years["age"].numpy(),
        edges=alone.edges,
        clip=alone.clip,
        point=alone.point,
    )
    np.testing.assert_allclose(age["value"], direct["value"], atol=1e-3)


def test_calibrate_chooses_the_point_estimate_on_validation(run, faces, tmp_path):
    """Mean or median of the head's year distribution: the lower validation MAE wins, is
    recorded, and every backend answers with it; an unknown point is one clear error."""
    meta = json.loads((run / "age" / "age.json").read_text())
    maes = meta["point_selection"]["val_mae"]
    assert meta["point"] == min(maes, key=maes.get) and set(maes) == {"mean", "median"}
    val = faces.subset("val")
    for point in ("mean", "median"):  # each MAE as recorded, from the age model alone
        model = B.resolve(run).load_age()
        model.point = point
        got = np.abs(model.predict(val.images)["value"] - val.age).mean()
        assert got == pytest.approx(maes[point], abs=1e-3)
    # a distribution by hand: mass 0.6 on year 20, 0.1 on 30, 0.3 spread over 117 years
    probs = np.full(117, 0.3 / 117)
    probs[20] += 0.6
    probs[30] += 0.1
    logits = np.log(probs)[None]
    kw = {"edges": [17, 26, 30, 38, 54], "clip": (1, 100)}
    mean = age_prediction("direct", year_logits=logits, **kw)["value"][0]
    median = age_prediction("direct", year_logits=logits, point="median", **kw)["value"][0]
    assert mean == pytest.approx((probs * np.arange(117)).sum()) and mean > 30
    assert median == 20.0  # P(age <= 19) = 0.05, P(age <= 20) = 0.66; the mean is 32.4
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    meta["point"] = "mode"
    (bad / "age" / "age.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="age point 'mode'"):
        B.resolve(bad).load_age()


def test_records_and_onnx_agree(run, faces, tmp_path):
    pytest.importorskip("onnxruntime")
    from faceattrs.backends import OnnxBackend
    from faceattrs.export import export_onnx

    rec = FaceAnalyzer(run).analyze(faces.images[0], detect=False)[0]
    assert set(rec) >= {"gender", "ethnicity", "age"} and len(rec["age"]["interval"]) == 2
    assert set(rec["age"]["bin_probabilities"]) == set(B.resolve(run).bin_labels)
    export_onnx(run, tmp_path / "onnx")
    manifest = json.loads((tmp_path / "onnx" / "faceattrs-onnx.json").read_text())
    assert manifest["graphs"] == {"multitask": "multitask.onnx"}
    assert manifest["age"]["direct"] == "multitask" and manifest["check"]["age_years"] < 0.05
    onnx, torch_ = OnnxBackend(tmp_path / "onnx"), TorchBackend(run)
    (lo, ao), (lt, at) = onnx.outputs(faces.images[:9]), torch_.outputs(faces.images[:9])
    np.testing.assert_allclose(lo["gender"], lt["gender"], atol=1e-3)
    np.testing.assert_allclose(ao["value"], at["value"], atol=0.05)
    np.testing.assert_allclose(onnx.age(faces.images[:9])["value"], ao["value"], atol=1e-6)


def test_evaluate_reports_the_direct_head(run, faces, tmp_path):
    from faceattrs.age import evaluate_age

    m = evaluate_age(run, faces, "val", tmp_path / "age")
    assert m["approach"] == "direct" and m["routing"] is None and m["mae_hard"] is None
    assert m["mae"] == m["direct"]["mae"] == m["default_mae"]
    assert m["ci95"]["mae"] == m["ci95"]["default_mae"]  # the same (direct) predictions
    assert m["ci95"]["default_mae"][0] <= m["default_mae"] <= m["ci95"]["default_mae"][1]
    assert set(m["mae_per_bin"]["0-17"]) == {"n", "direct"}
    # recomputed from the bundle's own predictions on the same faces
    val = faces.subset("val")
    pred = B.resolve(run).load_age().predict(val.images)
    assert m["mae"] == pytest.approx(np.abs(pred["value"] - val.age).mean(), abs=1e-4)
    low, high = pred["interval"]
    inside = (val.age >= low) & (val.age <= high)
    assert m["interval"]["coverage"] == pytest.approx(inside.mean(), abs=1e-4)
    assert m["interval"]["n"] == len(val)
    for png in ("age_scatter", "age_mae_by_bin", "age_mae_by_group", "age_grid"):
        assert (tmp_path / "age" / f"{png}.png").stat().st_size > 1000


def test_explain_leaves_the_age_head_out(run, faces):
    from faceattrs.explain import explain_faces

    net, _ = B.resolve(run).load_multitask()
    ex = explain_faces(net, faces.images[:2], {})
    assert set(ex["cams"]) == set(ex["probs"]) == {"gender", "ethnicity"}


def test_age_json_naming_a_missing_head_is_one_line(run, tmp_path, capsys):
    from predict_helpers import make_run

    two = make_run(tmp_path / "two")  # gender and ethnicity only
    shutil.rmtree(two / "age")
    shutil.copytree(run / "age", two / "age")
    with pytest.raises(CheckpointError, match="has none"):
        B.resolve(two)
    face = tmp_path / "f.png"
    from PIL import Image

    Image.fromarray(np.zeros((48, 48), np.uint8)).save(face)
    assert main(["predict", str(face), "--model", str(two), "--no-detect"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "age head" in err[0]
