"""dlib's face-recognition ResNet in PyTorch: the port gives dlib's own descriptors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import SHARED_PHOTOS
from PIL import Image

from faceattrs import dlib_resnet as dr
from faceattrs.dlib_resnet import (
    DlibFaceResNet,
    DlibFormatError,
    chips_to_input,
    default_dat_path,
    load_dlib_weights,
)
from faceattrs.photo import dlib_missing
from faceattrs.photo.detect import _dlib_model


def _dat_path():
    try:
        path = default_dat_path()
    except DlibFormatError as e:
        pytest.skip(str(e))
    if not path.is_file():
        pytest.skip(f"dlib's face-recognition model is absent: {path}")
    return path


@pytest.fixture(scope="module")
def port() -> DlibFaceResNet:
    return DlibFaceResNet.from_dat(_dat_path())  # the ~22 MB file, parsed once here


@pytest.fixture(scope="module")
def dlib_chips() -> tuple[list[np.ndarray], np.ndarray]:
    """dlib's 150x150 chips of the faces in the shared photos (HOG detector, 5 landmarks,
    ``get_face_chip`` at padding 0.25) and dlib's descriptors of those chips."""
    if dlib_missing():
        pytest.skip(f"dlib unavailable: {dlib_missing()}")
    if not SHARED_PHOTOS.is_dir():
        pytest.skip(f"real photos not available: {SHARED_PHOTOS} is absent (outside the repo)")
    import dlib

    detector = dlib.get_frontal_face_detector()
    shapes = dlib.shape_predictor(_dlib_model("shape_predictor_5_face_landmarks.dat"))
    chips = []
    for path in sorted(SHARED_PHOTOS.glob("*.jpg")):
        img = np.asarray(Image.open(path).convert("RGB"))
        for rect in detector(img, 0):
            chips.append(dlib.get_face_chip(img, shapes(img, rect), size=150, padding=0.25))
    if not chips:
        pytest.skip("no face found in the shared photos")
    rec = dlib.face_recognition_model_v1(str(_dat_path()))
    # the overload for an aligned 150x150 chip: both sides see the same pixels
    ref = np.array([np.array(rec.compute_face_descriptor(c)) for c in chips], np.float32)
    return chips, ref


def test_descriptors_equal_dlibs(port, dlib_chips):
    chips, ref = dlib_chips
    assert len(chips) >= 10
    with torch.no_grad():
        out = port(chips_to_input(np.stack(chips))).numpy()
    assert np.abs(out - ref).max() < 1e-4
    # dlib returns the last layer's output as it is: not unit vectors
    assert np.abs(np.linalg.norm(ref, axis=1) - 1).max() > 0.1


def test_batch_and_single_faces_agree(port, dlib_chips):
    chips = np.stack(dlib_chips[0][:4])
    with torch.no_grad():
        batch = port(chips_to_input(chips))
        single = torch.cat([port(chips_to_input(c)) for c in chips])
    assert torch.allclose(batch, single, atol=1e-5)


def test_onnx_export_gives_the_same_descriptors(port, dlib_chips, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    chips, ref = dlib_chips
    path = tmp_path / "dlib_resnet.onnx"
    x = chips_to_input(np.stack(chips[:2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's notices
        torch.onnx.export(
            port,
            (x,),
            str(path),
            input_names=["chips"],
            output_names=["descriptor"],
            dynamic_axes={"chips": {0: "batch"}, "descriptor": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = chips_to_input(np.stack(chips[:3])).numpy()  # another batch size than the trace
    (out,) = sess.run(None, {"chips": x3})
    assert out.shape == (3, 128)
    assert np.abs(out - ref[:3]).max() < 1e-4


def test_every_parameter_gets_a_gradient():
    model = DlibFaceResNet().train()
    x = torch.randn(2, 3, 150, 150)
    model(x).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_model_file_that_is_not_the_network_is_refused(tmp_path):
    data = _dat_path().read_bytes()
    cases = {
        "short.dat": data[:-1],
        "long.dat": data + b"\x00",
        # the first layer's name: "input_rgb_image_sized" -> "input_rgb_image_sizeX"
        "renamed.dat": data.replace(b"image_sized", b"image_sizeX", 1),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DlibFormatError, match=name):
            load_dlib_weights(tmp_path / name)
    with pytest.raises(DlibFormatError, match="not found"):
        load_dlib_weights(tmp_path / "absent.dat")


def test_reader_reads_dlibs_encodings():
    # int: control byte (byte count | 0x80 when negative), little-endian bytes;
    # float: mantissa and exponent as ints; bool: "0" / "1"; string: length, bytes
    raw = bytes([0x02, 0x80, 0x12, 0x81, 0x1C, 0x03, 0x0A, 0xD7, 0xA3, 0x81, 0x1C])
    r = dr._Reader(raw + b"1" + bytes([0x01, 0x03]) + b"con" + b"x", "example")
    assert (r.int(), r.int()) == (0x1280, -28)
    assert r.float() == pytest.approx(0.04, abs=1e-9)
    assert r.bool() is True
    assert r.string() == "con"
    with pytest.raises(DlibFormatError, match="bad bool"):
        r.bool()


def test_chips_must_be_uint8_rgb_150():
    with pytest.raises(ValueError, match="uint8 chips"):
        chips_to_input(np.zeros((1, 150, 150, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 chips"):
        chips_to_input(np.zeros((1, 112, 112, 3), np.uint8))


# ------------------------------------------------------------------ as a faceattrs backbone


def test_dlib_arch_from_the_preset_starts_from_dlibs_weights(port, dlib_chips, tmp_path):
    """The ``dlib`` preset builds arch dlib_resnet on dlib's input contract; init=dlib gives
    the port's descriptors as the embedding, the photo path's dlib crop gives its chips."""
    from faceattrs import training as T
    from faceattrs.checkpoint import load_model, save_checkpoint
    from faceattrs.config import ConfigError
    from faceattrs.model import build_model
    from faceattrs.photo import extract_faces

    cfg = T.resolve_config("dlib")
    net = build_model(T.model_config(cfg))
    assert net.input == dr.INPUT and net.input.crop == "dlib"
    record = T.load_init(net, "dlib")
    assert record["source"] == f"dlib:{dr.DAT_NAME}"
    chips, _ = dlib_chips
    faces = torch.from_numpy(np.stack(chips[:3]))
    net.eval()
    with torch.no_grad():  # uint8 chips in: dlib's normalisation inside the network
        assert torch.allclose(net.embed(faces), port(chips_to_input(faces)), atol=1e-4)
    save_checkpoint(tmp_path, "best", net, {"epoch": 0})
    back, meta = load_model(tmp_path)
    assert meta["input"]["crop"] == "dlib" and type(back) is type(net)
    photo = sorted(SHARED_PHOTOS.glob("*.jpg"))[0]
    crop = extract_faces(str(photo), spec=dr.INPUT)[0].crop
    assert crop.shape == (150, 150, 3)
    with pytest.raises(ConfigError, match="150x150"):
        T.resolve_config("dlib", {"image_size": 96})
    with pytest.raises(T.TrainError, match="arch=dlib_resnet"):
        T.load_init(build_model(T.model_config(T.resolve_config("paper"))), "dlib")


def test_dlib_heads_preset_trains_the_heads_on_dlibs_frozen_network(port, tmp_path):
    """``dlib-heads`` (the default model's first stage) is the ``dlib`` preset's network
    from dlib's weights with the backbone frozen and no augmentation: its 128-d descriptors
    are computed once, the three heads train on them, and the backbone ends as dlib's."""
    from conftest import synthetic_faceset
    from safetensors.torch import load_file

    from faceattrs import training as T
    from faceattrs.dataset import FaceSet
    from faceattrs.model import build_model

    heads, stage2 = T.resolve_config("dlib-heads"), T.resolve_config("dlib")
    assert T.model_config(heads) == T.model_config(stage2)  # one network: stage 2's init=
    assert (heads.init, heads.freeze, heads.augment.enabled) == ("dlib", "backbone", False)
    assert (heads.epochs, heads.lr, heads.min_lr, heads.warmup_epochs) == (40, 3e-3, 3e-3, 0)
    assert heads.age_head and heads.ema == 0 and not heads.balanced

    small = synthetic_faceset(30)
    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, (30, *dr.INPUT.shape), dtype=np.uint8)
    faces = FaceSet.of(chips, small.age, small.gender, small.ethnicity, small.split, small.names)
    cfg = T.resolve_config("dlib-heads", {"epochs": 2, "batch_size": 8, "device": "cpu",
                                          "threads": 1, "lr": 1e-2, "min_lr": 1e-2})  # fmt: skip
    T.fit(faces, tmp_path / "run", cfg, progress=False)
    last = load_file(str(tmp_path / "run" / "last.safetensors"))
    dlib = port.state_dict()
    assert all(torch.equal(last[f"backbone.{k}"], v) for k, v in dlib.items())
    torch.manual_seed(cfg.seed)  # the heads' initial weights, as fit draws them
    init = build_model(T.model_config(cfg)).state_dict()
    moved = [k for k in last if k.startswith("heads.") and not torch.equal(last[k], init[k])]
    assert moved == [k for k in last if k.startswith("heads.")] and len(moved) == 12
