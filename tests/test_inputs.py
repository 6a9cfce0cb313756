"""The input contract belongs to the model: an InputSpec in its settings and checkpoint,
normalisation inside the network, and every stage (prepare, augment, train, photo path,
export, Grad-CAM) reading the spec of the model it serves. Ends with the colour preset
end to end on a tiny configuration, and a second backbone plugged in at one place."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from faceattrs import model as M
from faceattrs import training as T
from faceattrs.augment import AugmentConfig, Augmenter
from faceattrs.bundle import resolve
from faceattrs.checkpoint import CheckpointError, load_model, save_checkpoint
from faceattrs.exceptions import FaceattrsError
from faceattrs.inputs import GRAY48, InputSpec, normalise
from faceattrs.photo import extract_faces
from faceattrs.prepare import PrepareConfig, load_prepared, prepare

RGB32 = InputSpec(size=32, channels=3)


def rgb_config(**kw) -> M.ModelConfig:
    return M.ModelConfig(width=0.125, **M.input_settings(RGB32), stem_stride=2, **kw)


# ------------------------------------------------------------------ the spec


def test_spec_round_trips_and_checks_its_values():
    spec = InputSpec(size=96, channels=3, mean=(0.4, 0.5, 0.6), std=(0.2,))
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert InputSpec.from_dict(None) == GRAY48 == InputSpec.from_dict({})
    assert spec.shape == (96, 96, 3) and GRAY48.shape == (48, 48)
    for bad in ({"channels": 2}, {"size": 4}, {"mean": (0.1, 0.2)}, {"std": (0.0,)},
                {"crop": "tight"}, {"colour": True}):  # fmt: skip
        with pytest.raises(ValueError):
            InputSpec.from_dict(bad)


def test_rgb_normalise_is_per_channel_and_channels_first():
    spec = InputSpec(size=8, channels=3, mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25))
    faces = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    faces[..., 1] = 255
    x = spec.normalise(faces)
    assert x.shape == (2, 3, 8, 8)
    assert x[:, 0].unique().tolist() == [0.0]  # (0 - 0) / 1
    assert x[:, 1].unique().tolist() == [1.0]  # (1 - 0.5) / 0.5
    assert x[:, 2].unique().tolist() == [-4.0]  # (0 - 1) / 0.25


# ------------------------------------------------------------------ the network


def test_network_normalises_uint8_faces_itself():
    """uint8 in = the old "normalise outside" path, bit for bit (gray and RGB, with flip)."""
    torch.manual_seed(0)
    gray = M.FaceResNet(M.ModelConfig(width=0.125)).eval()
    faces = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    assert torch.equal(gray(faces)["gender"], gray(normalise(faces))["gender"])
    rgb = M.FaceResNet(rgb_config()).eval()
    faces = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    ref = rgb(RGB32.normalise(faces))["ethnicity"]
    assert torch.equal(rgb(faces)["ethnicity"], ref)
    mirrored = rgb(RGB32.normalise(faces).flip(-1))["ethnicity"]
    rgb.flip_tta = True  # the mirror is taken across the width, never across the colours
    assert torch.allclose(rgb(faces)["ethnicity"], (ref + mirrored) / 2, atol=1e-6)


def test_stride_two_stem_halves_the_maps():
    net = M.FaceResNet(rgb_config()).eval()
    feats = net.forward_features(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    assert feats.shape[-2:] == (2, 2)  # 32 / 2 (stem) / 8 (three strided stages)
    with pytest.raises(ValueError, match="stem_stride"):
        M.ModelConfig(stem_stride=3)
    with pytest.raises(ValueError, match="arch"):
        M.ModelConfig(arch="vit")


def test_checkpoint_carries_the_contract(tmp_path):
    torch.manual_seed(0)
    net = M.FaceResNet(rgb_config()).eval()
    save_checkpoint(tmp_path, "best", net, {"epoch": 1})
    meta = json.loads((tmp_path / "best.json").read_text())
    assert meta["input"] == RGB32.to_dict() and meta["image_size"] == 32
    back, _ = load_model(tmp_path)
    assert back.input == RGB32 and resolve(tmp_path / "best.json").input == RGB32
    faces = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(back(faces)["gender"], net(faces)["gender"])
    # settings that contradict the model's own contract are refused, in one line
    meta["normalisation"] = {"mean": 0.5, "std": 0.25}
    (tmp_path / "best.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="normalisation"):
        load_model(tmp_path)


def test_checkpoints_without_a_contract_are_48_pixel_gray():
    """The shipped 48x48 model (v5) predates InputSpec: it loads as the reference's input."""
    bundle = resolve("utk48")
    assert "input" not in bundle.meta and bundle.input == GRAY48
    net, _ = bundle.load_multitask()
    assert net.input == GRAY48


# ------------------------------------------------------------------ data, augmentation


def _photo_folder(folder, n=40, size=64, seed=0):
    """UTKFace-style labelled colour photos: a reddish or bluish square by gender."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i in range(n):
        age, gender, eth = 10 + i % 60, i % 2, (i // 2) % 5
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        img[..., 2 * gender] = np.clip(img[..., 2 * gender].astype(int) + 90, 0, 255)
        cv2.imwrite(str(folder / f"{age}_{gender}_{eth}_{i:04d}.jpg"), img)  # BGR on disk
    return folder


def test_prepare_stores_photos_in_the_requested_format_with_the_gray_split(tmp_path):
    photos = _photo_folder(tmp_path / "photos")
    prepare(photos, tmp_path / "gray")
    prepare(photos, tmp_path / "rgb", PrepareConfig(image_size=32, channels=3))
    gray, rgb = load_prepared(tmp_path / "gray"), load_prepared(tmp_path / "rgb")
    assert gray.images.shape[1:] == (48, 48) and rgb.images.shape[1:] == (32, 32, 3)
    assert np.array_equal(gray.split, rgb.split) and np.array_equal(gray.names, rgb.names)
    one = photos / rgb.names[0]  # RGB, not OpenCV's BGR
    want = cv2.resize(cv2.cvtColor(cv2.imread(str(one)), cv2.COLOR_BGR2RGB), (32, 32),
                      interpolation=cv2.INTER_AREA)  # fmt: skip
    assert np.array_equal(rgb.images[0], want)


def test_a_csv_holds_only_48_pixel_gray_faces(tmp_path, shared_csv):
    with pytest.raises(FaceattrsError, match="48x48 grayscale"):
        prepare(shared_csv, tmp_path / "x", PrepareConfig(image_size=96, channels=3))


def test_augmenter_keeps_colour_and_standardises_by_the_spec():
    spec = InputSpec(size=32, channels=3, mean=(0.25,), std=(0.25,))
    aug = Augmenter(AugmentConfig(jpeg_p=1.0, camera_p=1.0), minority=(1,), spec=spec)
    faces = torch.full((4, 32, 32, 3), 128, dtype=torch.uint8)
    faces[..., 0] = 255  # red
    x = aug(faces, torch.tensor([0, 1, 0, 1]))
    assert x.shape == (4, 3, 32, 32)
    assert x.min() >= -1.0 and x.max() <= 3.0  # [0, 1] -> (x - 0.25) / 0.25
    centre = x[:, :, 12:20, 12:20].mean((0, 2, 3))
    assert centre[0] > centre[1] + 0.5  # still red in the middle, after jpeg and camera ops
    off = Augmenter(AugmentConfig(enabled=False), spec=spec)(faces, torch.zeros(4).long())
    assert torch.equal(off, spec.normalise(faces))


# ------------------------------------------------------------------ the photo path


def test_photo_path_crops_to_the_models_contract(shared_photos):
    photo = sorted(shared_photos.glob("*.jpg"))[0]
    gray = extract_faces(str(photo))
    rgb = extract_faces(str(photo), spec=InputSpec(size=96, channels=3))
    assert gray[0].crop.shape == (48, 48) and rgb[0].crop.shape == (96, 96, 3)
    assert gray[0].box == rgb[0].box
    # the same framing: the colour crop's luma, shrunk, is the gray crop (up to rounding)
    luma = cv2.resize(cv2.cvtColor(rgb[0].crop, cv2.COLOR_RGB2GRAY), (48, 48),
                      interpolation=cv2.INTER_AREA)  # fmt: skip
    assert np.abs(luma.astype(int) - gray[0].crop.astype(int)).mean() < 4
    given = extract_faces(np.zeros((50, 70, 3), np.uint8), detect=False, spec=RGB32)
    assert given[0].crop.shape == (32, 32, 3)


# ------------------------------------------------------------------ colour end to end


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """The rgb preset, shrunk: 32x32 colour faces, stride-2 stem, one epoch."""
    base = tmp_path_factory.mktemp("rgb")
    photos = _photo_folder(base / "photos", n=60)
    data = base / "prepared"
    prepare(photos, data, PrepareConfig(image_size=32, channels=3))
    cfg = T.resolve_config("rgb", {"image_size": 32, "width": 0.125, "epochs": 1,
                                   "batch_size": 16, "device": "cpu", "threads": 1,
                                   "warmup_epochs": 0.5})  # fmt: skip
    run = base / "run"
    T.fit(load_prepared(data), run, cfg, data_ref=str(data), progress=False)
    return run, data, photos


def test_rgb_preset_is_colour_and_the_paper_preset_is_not():
    rgb, paper = T.resolve_config("rgb"), T.resolve_config("paper")
    assert T.model_config(rgb).input.shape == (96, 96, 3) and rgb.stem_stride == 2
    assert T.model_config(paper).input == GRAY48 and paper.stem_stride == 1
    assert T.model_config(paper) == M.ModelConfig()  # the reference network, unchanged


def test_training_refuses_data_in_another_format(tmp_path, tiny_faces):
    cfg = T.resolve_config("rgb", {"image_size": 32, "width": 0.125, "epochs": 1})
    with pytest.raises(T.TrainError, match=r"32x32 RGB faces, but .* 48x48 grayscale"):
        T.fit(tiny_faces, tmp_path / "run", cfg, progress=False)


def test_colour_run_predicts_explains_and_exports(rgb_run, tmp_path):
    from faceattrs.evaluate import load_data
    from faceattrs.explain import grad_cam
    from faceattrs.export import export_onnx
    from faceattrs.predict import FaceAnalyzer

    run, data, photos = rgb_run
    bundle = resolve(run)
    assert bundle.input == RGB32
    faces = load_data(run, data, "val")
    assert faces.images.shape[1:] == (32, 32, 3)
    prepare(photos, tmp_path / "gray")  # the same photos as 48x48 gray: not this model's
    with pytest.raises(FaceattrsError, match="takes 32x32 RGB faces, but .* 48x48 grayscale"):
        load_data(run, tmp_path / "gray", "val")
    photo = sorted(photos.glob("*.jpg"))[0]
    an = FaceAnalyzer(run, photo_workers="threads")
    rec = an.analyze(str(photo), detect=False)[0]
    assert an.input == RGB32 and set(rec["gender"]["probabilities"]) == {"Male", "Female"}
    net, _ = bundle.load_multitask()
    cams = grad_cam(net, faces.images[:3], "gender")
    assert cams.shape == (3, 32, 32) and np.isfinite(cams).all()
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    export_onnx(run, out)
    manifest = json.loads((out / "faceattrs-onnx.json").read_text())
    assert manifest["input"]["shape"] == ["batch", 32, 32, 3]
    onnx_an = FaceAnalyzer(out, backend="onnx", photo_workers="threads")
    assert onnx_an.input == RGB32
    orec = onnx_an.analyze(str(photo), detect=False)[0]
    for h in ("gender", "ethnicity"):
        a, b = rec[h]["probabilities"], orec[h]["probabilities"]
        assert max(abs(a[k] - b[k]) for k in a) < 1e-3


# ------------------------------------------------------------------ a second backbone


class TinyNet(nn.Module):
    """A new backbone needs only the FaceResNet interface and a key in ARCHS."""

    cam_layer = "body"
    flip_tta = False

    def __init__(self, cfg: M.ModelConfig):
        super().__init__()
        self.cfg, self.input = cfg, cfg.input
        self.body = nn.Sequential(nn.Conv2d(cfg.in_channels, 8, 3, 2, 1), nn.ReLU())
        self.embed_dim = 8
        self.heads = nn.ModuleDict({h: nn.Linear(8, k) for h, k in cfg.heads.items()})

    def forward_features(self, x):
        return self.body(M.prepare_input(self, x))

    def embed(self, x):
        return self.forward_features(x).mean((2, 3))

    def forward_head(self, z):
        return {h: head(z) for h, head in self.heads.items()}

    def logits_and_embedding(self, x):
        z = self.embed(x)
        return self.forward_head(z), z

    def forward(self, x):
        return self.logits_and_embedding(x)[0]


def test_a_backbone_plugs_in_at_one_place(monkeypatch, tmp_path):
    monkeypatch.setitem(M.ARCHS, "tiny", TinyNet)
    cfg = replace(rgb_config(), arch="tiny")
    net = M.build_model(cfg).eval()
    save_checkpoint(tmp_path, "best", net, {"epoch": 1})
    back, meta = load_model(tmp_path)
    assert isinstance(back, TinyNet) and meta["model"]["arch"] == "tiny"
    faces = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(back(faces)["gender"], net(faces)["gender"])
