"""Grad-CAM: shape, range, dependence on head and target, agreement with a hand-written
Grad-CAM, and the misclassified / photo paths on a tiny random model."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import synthetic_faceset

from faceattrs import explain as X
from faceattrs.checkpoint import load_model, save_checkpoint
from faceattrs.exceptions import FaceattrsError
from faceattrs.inputs import normalise
from faceattrs.model import FaceResNet, ModelConfig, predict


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(path, "best", FaceResNet(ModelConfig(width=0.125)), {"epoch": 0, "score": 0.0})
    return path


@pytest.fixture(scope="module")
def model(run):
    return load_model(run)[0]


def test_maps_are_48x48_in_unit_range(model):
    faces = synthetic_faceset(10).images
    cams = X.grad_cam(model, faces, "gender", batch_size=4)  # batches of 4, 4, 2
    assert cams.shape == (10, 48, 48) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1
    peaks = cams.reshape(10, -1).max(1)
    assert np.all((peaks == 0) | np.isclose(peaks, 1))  # each map scaled to its own peak
    assert (peaks > 0).sum() >= 8


def test_maps_change_with_the_head_and_the_target(model):
    faces = synthetic_faceset(6).images
    g, e = X.grad_cam(model, faces, "gender"), X.grad_cam(model, faces, "ethnicity")
    assert np.abs(g - e).mean() > 0.02
    e0 = X.grad_cam(model, faces, "ethnicity", target=np.zeros(6, int))
    e3 = X.grad_cam(model, faces, "ethnicity", target=np.full(6, 3))
    assert np.abs(e0 - e3).mean() > 0.02


def test_captum_layer_cam_equals_hand_written_grad_cam(model):
    x = normalise(torch.as_tensor(synthetic_faceset(5).images))
    target = torch.tensor([0, 1, 2, 3, 4])
    feats = model.forward_features(x).detach().requires_grad_(True)
    logits = model.forward_head(model.pool(feats).flatten(1))["ethnicity"]
    (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), feats)
    manual = torch.relu((grads.mean((2, 3), keepdim=True) * feats).sum(1)).detach()
    ours = X.layer_cam(model, x, "ethnicity", target)
    assert ours.shape == (5, 6, 6)
    torch.testing.assert_close(ours, manual, atol=1e-6, rtol=1e-4)


def test_smooth_upsampling_keeps_range():
    cam = np.zeros((48, 48), np.float32)
    cam[20:28, 20:28] = 1
    big = X.smooth(cam)
    assert big.shape == (X.DISPLAY_SIZE, X.DISPLAY_SIZE) and big.min() >= 0 and big.max() <= 1
    assert big[96, 96] > 0.9 and big[0, 0] == 0


def test_parse_classes():
    assert X.parse_classes("indian, OTHER") == ["Indian", "Other"]
    with pytest.raises(FaceattrsError, match="unknown ethnicity"):
        X.parse_classes("Indian,Martian")


def test_misclassified_grid_shows_only_mistakes_of_the_asked_classes(run, model, tmp_path):
    faces = synthetic_faceset(60)
    faces.split[:] = 2
    out = X.explain_misclassified(run, faces, "Indian,Other", tmp_path, max_faces=5)
    pred = predict(model, faces.images)["ethnicity"].argmax(1)
    expected = int((np.isin(faces.ethnicity, [3, 4]) & (pred != faces.ethnicity)).sum())
    assert out["n_misclassified"] == expected and out["n_shown"] == min(5, expected)
    for face in out["faces"]:
        assert face["true"]["ethnicity"] in ("Indian", "Other")
        assert face["ethnicity"]["label"] != face["true"]["ethnicity"]
        assert pred[face["index"]] != faces.ethnicity[face["index"]]
    saved = json.loads((tmp_path / "misclassified_Indian-Other.json").read_text())
    assert saved["n_shown"] == out["n_shown"]
    if expected:
        npz = np.load(tmp_path / "misclassified_Indian-Other_gradcam.npz")
        assert npz["gender_cam"].shape == (out["n_shown"], 48, 48)
        assert (tmp_path / "misclassified_Indian-Other.png").exists()


@dataclass
class FakeFace:
    box: tuple
    crop: np.ndarray


def test_photo_path_through_the_photo_stage_api(run, tmp_path, monkeypatch):
    """The photo stage's contract (load_image, extract_faces -> .box, .crop), faked here."""
    crops = synthetic_faceset(2).images
    fake = lambda image, spec=None: [  # noqa: E731
        FakeFace((10, 20, 40, 40), crops[0]),
        FakeFace((90, 30, 50, 50), crops[1]),
    ]
    monkeypatch.setattr(
        X, "load_image", lambda p, max_pixels=None: np.full((120, 160, 3), 128, np.uint8)
    )
    monkeypatch.setattr(X, "extract_faces", fake)
    out = X.explain_photo(run, tmp_path / "group.jpg", tmp_path / "explain")
    assert [f["box"] for f in out["faces"]] == [[10, 20, 40, 40], [90, 30, 50, 50]]
    for face in out["faces"]:
        assert set(face) == {"box", "detector", "gender", "ethnicity"}
        assert sum(face["ethnicity"]["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    for name in ("group_faces.png", "group_gradcam.png", "group_gradcam.npz", "group.json"):
        assert (tmp_path / "explain" / name).exists(), name
    monkeypatch.setattr(X, "extract_faces", lambda image, spec=None: [])
    with pytest.raises(FaceattrsError, match="no face found"):
        X.explain_photo(run, tmp_path / "empty.jpg", tmp_path / "explain")


def test_real_photo(run, shared_photos, tmp_path):
    photo = sorted(shared_photos.glob("*.jpg"))[0]
    out = X.explain_photo(run, photo, tmp_path)
    assert len(out["faces"]) >= 1
    cams = np.load(tmp_path / f"{photo.stem}_gradcam.npz")
    assert cams["ethnicity_cam"].shape[1:] == (48, 48)
