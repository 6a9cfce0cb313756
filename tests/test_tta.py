"""Flip test-time augmentation: what the model computes, how calibrate chooses it on the
validation split, and that every consumer (bundle, backends, ONNX export, Grad-CAM) applies
the same choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_evaluate import split_faces, tiny_run

from faceattrs.backends import TorchBackend
from faceattrs.bundle import resolve
from faceattrs.calibrate import calibrate_run, choose_flip_tta, val_score
from faceattrs.cli import main
from faceattrs.exceptions import FaceattrsError
from faceattrs.model import FaceResNet, ModelConfig, predict


@pytest.fixture(scope="module")
def net() -> FaceResNet:
    torch.manual_seed(1)
    return FaceResNet(ModelConfig(width=0.125)).eval()


def test_flip_tta_is_the_mean_of_face_and_mirror_logits(net):
    x = torch.randn(3, 1, 48, 48)
    with torch.no_grad():
        net.flip_tta = False
        plain, mirrored = net(x), net(torch.flip(x, dims=(-1,)))
        net.flip_tta = True
        tta = net(x)
        tta_of_mirror = net(torch.flip(x, dims=(-1,)))
        net.flip_tta = False
    for h in plain:
        assert torch.allclose(tta[h], (plain[h] + mirrored[h]) / 2, atol=1e-5)
        assert torch.allclose(tta[h], tta_of_mirror[h], atol=1e-5)  # mirror-invariant
        assert not torch.allclose(tta[h], plain[h], atol=1e-4)  # and not a no-op


def test_flip_tta_never_acts_in_training(net):
    x = torch.randn(4, 1, 48, 48)
    net.flip_tta = True
    net.train()
    try:
        torch.manual_seed(0)
        a = net(x)["gender"]
        net.flip_tta = False
        torch.manual_seed(0)
        b = net(x)["gender"]
    finally:
        net.flip_tta = False
        net.eval()
    assert torch.allclose(a, b)


def test_predict_returns_the_plain_embedding_with_tta_logits(net):
    faces = np.random.default_rng(0).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    plain = predict(net, faces, embed=True)
    net.flip_tta = True
    try:
        tta = predict(net, faces, embed=True)
    finally:
        net.flip_tta = False
    assert np.allclose(tta["embedding"], plain["embedding"], atol=1e-6)
    assert not np.allclose(tta["gender"], plain["gender"], atol=1e-4)


def test_choose_flip_tta_compares_both_on_validation(net):
    val = split_faces().subset("val")
    heads = ["gender", "ethnicity"]
    choice, sel = choose_flip_tta(net, val, heads, "auto")
    plain, flip = sel["val_score"]["plain"], sel["val_score"]["flip"]
    assert choice == (flip > plain) and net.flip_tta == choice
    net.flip_tta = False
    assert plain == val_score(predict(net, val.images), val, heads)
    assert choose_flip_tta(net, val, heads, "on")[0] is True and net.flip_tta is True
    assert choose_flip_tta(net, val, heads, "off")[0] is False and net.flip_tta is False
    with pytest.raises(FaceattrsError, match="flip_tta must be one of"):
        choose_flip_tta(net, val, heads, "maybe")


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory):
    run = tiny_run(tmp_path_factory.mktemp("run"))
    result = calibrate_run(run, split_faces(), flip_tta="on")
    return run, result


def test_calibrate_records_the_choice_and_the_bundle_applies_it(tta_run):
    run, result = tta_run
    saved = json.loads((run / "calibration.json").read_text())
    assert saved["flip_tta"] is True and result["flip_tta"] is True
    assert set(saved["flip_tta_selection"]["val_score"]) == {"plain", "flip"}
    bundle = resolve(run)
    assert bundle.flip_tta is True and bundle.provenance["flip_tta"] is True
    model, _ = bundle.load_multitask()
    assert model.flip_tta is True
    # temperatures were fitted to the logits prediction uses: refitting them on the
    # flip-averaged logits gives the same values
    from faceattrs.calibrate import fit_temperature

    val = split_faces().subset("val")
    z = predict(model, val.images)
    assert fit_temperature(z["gender"], val.gender) == pytest.approx(
        saved["temperatures"]["gender"], rel=1e-3
    )


def test_backend_uses_the_bundles_choice(tta_run):
    run, _ = tta_run
    faces = np.random.default_rng(1).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    on = TorchBackend(run).logits(faces)["gender"]
    mirrored = TorchBackend(run).logits(np.ascontiguousarray(faces[:, :, ::-1]))["gender"]
    assert np.allclose(on, mirrored, atol=1e-4)  # the mean over face and mirror is symmetric


def test_calibrate_cli_says_the_choice(tmp_path, monkeypatch, capsys):
    run = tiny_run(tmp_path / "run")
    monkeypatch.setattr("faceattrs.evaluate.load_data", lambda *a, **k: split_faces())
    assert main(["calibrate", "--model", str(run), "--flip-tta", "off"]) == 0
    out = capsys.readouterr().out
    assert "flip TTA: off (validation score plain" in out
    assert resolve(run).flip_tta is False
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", str(run), "--flip-tta", "sometimes"])
    assert e.value.code == 2


def test_bad_flip_tta_value_in_calibration_is_one_clear_error(tmp_path):
    run = tiny_run(tmp_path / "run")
    (run / "calibration.json").write_text(json.dumps({"temperatures": {}, "flip_tta": "yes"}))
    with pytest.raises(FaceattrsError, match="flip_tta must be true or false"):
        resolve(run)


def test_grad_cam_explains_the_face_as_given(tta_run):
    pytest.importorskip("captum")
    from faceattrs.explain import grad_cam

    run, _ = tta_run
    model, _ = resolve(run).load_multitask()
    faces = np.random.default_rng(2).integers(0, 256, (3, 48, 48), dtype=np.uint8)
    target = np.array([0, 1, 0])
    with_tta = grad_cam(model, faces, "gender", target)
    assert model.flip_tta is True  # restored
    model.flip_tta = False
    assert np.allclose(with_tta, grad_cam(model, faces, "gender", target), atol=1e-5)


def test_onnx_export_bakes_the_flip_in(tta_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from faceattrs.backends import OnnxBackend
    from faceattrs.export import MANIFEST, export_onnx

    run, _ = tta_run
    export_onnx(run, tmp_path / "onnx")
    m = json.loads((tmp_path / "onnx" / MANIFEST).read_text())
    assert m["flip_tta"] is True and resolve(tmp_path / "onnx").flip_tta is True
    assert m["check"]["gender_logits"] <= 1e-3
    faces = np.random.default_rng(3).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    onnx = OnnxBackend(tmp_path / "onnx").logits(faces)["gender"]
    assert np.allclose(onnx, TorchBackend(run).logits(faces)["gender"], atol=1e-3)


# ---------------------------------------------------------------- the age model


@pytest.fixture(scope="module")
def age_run(tmp_path_factory):
    from predict_helpers import make_run

    return make_run(tmp_path_factory.mktemp("agerun"))


def _age_val():
    faces = split_faces()
    faces.age[:] = np.arange(len(faces)) % 80 + 1
    return faces


def test_age_flip_is_the_mean_of_face_and_mirror(age_run):
    am = resolve(age_run).load_age()
    faces = np.random.default_rng(4).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    mirror = np.ascontiguousarray(faces[:, :, ::-1])
    am.flip_tta = False
    (la, pa), (lb, pb) = am.two_stage_outputs(faces), am.two_stage_outputs(mirror)
    da, db = am.direct_predict(faces), am.direct_predict(mirror)
    am.flip_tta = True
    lf, pf = am.two_stage_outputs(faces)
    assert np.allclose(lf, (la + lb) / 2, atol=1e-5) and np.allclose(pf, (pa + pb) / 2, atol=1e-4)
    assert np.allclose(
        am.direct_predict(faces)["value"], am.direct_predict(mirror)["value"], atol=1e-3
    )
    assert not np.allclose(da["value"], db["value"], atol=1e-3)  # the flip is not a no-op
    out = am.two_stage(faces)
    assert out["embedding"].shape[0] == 5  # the face's own embedding


def test_choose_age_flip_refits_the_interval(age_run):
    from faceattrs.age.networks import choose_flip_tta as choose_age

    am = resolve(age_run).load_age()
    val = _age_val().subset("val")
    choice, sel = choose_age(am, val, "auto")
    assert choice == (sel["val_mae"]["flip"] < sel["val_mae"]["plain"]) and am.flip_tta == choice
    assert am.interval is not None and am.interval["alpha"] == pytest.approx(0.1)
    on = choose_age(am, val, "on")[0]
    width_on = am.interval
    off = choose_age(am, val, "off")[0]
    assert on is True and off is False and am.interval != width_on  # refitted each time
    with pytest.raises(Exception, match="flip_tta must be one of"):
        choose_age(am, val, "perhaps")


def test_calibrate_chooses_for_the_age_model_too(tmp_path):
    from predict_helpers import make_run

    run = make_run(tmp_path / "run")
    result = calibrate_run(run, _age_val(), flip_tta="on")
    assert result["age"]["flip_tta"] is True
    saved = json.loads((run / "age" / "age.json").read_text())
    assert saved["flip_tta"] is True and set(saved["flip_tta_selection"]["val_mae"]) == {
        "plain",
        "flip",
    }
    assert resolve(run).load_age().flip_tta is True
    pytest.importorskip("onnxruntime")
    from faceattrs.backends import OnnxBackend
    from faceattrs.export import MANIFEST, agreement, export_onnx

    export_onnx(run, tmp_path / "onnx")
    m = json.loads((tmp_path / "onnx" / MANIFEST).read_text())
    assert m["age"]["flip_tta"] is True
    faces = np.random.default_rng(5).integers(0, 256, (6, 48, 48), dtype=np.uint8)
    diffs = agreement(TorchBackend(run), OnnxBackend(tmp_path / "onnx"), faces)
    assert diffs["age_years"] <= 1e-2 and diffs["age_bin_probabilities"] <= 1e-3


def test_bad_age_flip_value_is_one_clear_error(tmp_path):
    from predict_helpers import make_run

    from faceattrs.checkpoint import CheckpointError

    run = make_run(tmp_path / "run")
    meta = json.loads((run / "age" / "age.json").read_text())
    meta["flip_tta"] = "yes"
    (run / "age" / "age.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="flip_tta must be true or false"):
        resolve(run).load_age()
