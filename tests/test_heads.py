"""Heads are data: a model with another head set (3 heads, 7 ethnicity classes) goes
through train one batch -> save -> load -> predict -> export with no library change."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from faceattrs.backends import TorchBackend
from faceattrs.bundle import resolve
from faceattrs.checkpoint import save_checkpoint
from faceattrs.inputs import GENDERS, normalise
from faceattrs.model import FaceResNet, ModelConfig, predict
from faceattrs.postprocess import softmax
from faceattrs.predict import FaceAnalyzer
from faceattrs.predict_files import predict_files
from faceattrs.training import (
    TrainConfig,
    evaluate_heads,
    history_fields,
    make_optimizer,
    multitask_loss,
    train_one_epoch,
)

HEADS = {"gender": 2, "ethnicity": 7, "smile": 2}
NAMES = {
    "gender": list(GENDERS),
    "ethnicity": [f"group{i}" for i in range(7)],  # another data set's 7 classes
    "smile": ["no", "yes"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-head model after one training batch, saved as a run folder."""
    rng = np.random.default_rng(0)
    n = 24
    images = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
    data = {"image": torch.from_numpy(images)}
    data |= {h: torch.from_numpy(rng.integers(0, k, n)) for h, k in HEADS.items()}
    torch.manual_seed(0)
    model = FaceResNet(ModelConfig(width=0.125, heads=HEADS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = multitask_loss(TrainConfig(), HEADS)
    opt = make_optimizer(model.parameters(), 1e-2, 0.0)
    tr = train_one_epoch(
        model, loss_fn, data, torch.arange(n), opt, lambda b: normalise(b["image"]),
        batch_size=n, progress=False,
    )  # fmt: skip
    assert {k for k in tr if k.startswith("loss_")} == {f"loss_{h}" for h in HEADS}
    for h in HEADS:  # every head learned
        key = f"heads.{h}.fc.weight"
        assert not torch.equal(before[key], model.state_dict()[key]), h
    ev = evaluate_heads(model, data, HEADS, batch_size=10)
    assert all(np.array(ev[h]["confusion"]).shape == (k, k) for h, k in HEADS.items())
    assert {f"val_{h}_macro_f1" for h in HEADS} <= set(history_fields(HEADS))
    run = tmp_path_factory.mktemp("heads") / "run"
    save_checkpoint(run, "best", model, {"epoch": 1, "score": 0.0, "class_names": NAMES})
    return run, model.eval(), images


def test_saved_bundle_declares_the_heads(trained):
    run, _, _ = trained
    b = resolve(run)
    assert b.heads == NAMES and list(b.meta["model"]["heads"]) == list(HEADS)
    loaded, _ = b.load_multitask()
    assert {h: head.fc.out_features for h, head in loaded.heads.items()} == HEADS


def test_predict_records_every_head(trained, tmp_path):
    run, model, images = trained
    expected = predict(model, images[:5])
    recs = FaceAnalyzer(run).analyze(list(images[:5]), detect=False)
    assert len(recs) == 5
    for i, rec in enumerate(recs):
        for h in HEADS:
            probs = softmax(expected[h][i : i + 1])[0]
            assert list(rec[h]["probabilities"]) == NAMES[h]
            assert rec[h]["label"] == NAMES[h][int(probs.argmax())]
            np.testing.assert_allclose(list(rec[h]["probabilities"].values()), probs, atol=1e-3)
    # the CSV of `faceattrs predict` gets a column per class of every head
    from PIL import Image

    Image.fromarray(images[0]).save(tmp_path / "face.png")
    out = tmp_path / "out.csv"
    predict_files([str(tmp_path / "face.png")], run, out=out, detect=False)
    row = next(csv.DictReader(out.open()))
    assert row["smile"] in NAMES["smile"] and "ethnicity_p_group6" in row


def test_export_keeps_every_head(trained, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from faceattrs.backends import OnnxBackend
    from faceattrs.export import MANIFEST, agreement, export_onnx

    run, _, images = trained
    export_onnx(run, tmp_path / "onnx")
    manifest = json.loads((tmp_path / "onnx" / MANIFEST).read_text())
    assert manifest["class_names"] == NAMES
    onnx = OnnxBackend(tmp_path / "onnx")
    assert {h: v.shape for h, v in onnx.logits(images).items()} == {
        h: (len(images), k) for h, k in HEADS.items()
    }
    diffs = agreement(TorchBackend(run), onnx, images)
    assert {f"{h}_probabilities" for h in HEADS} <= set(diffs)
    assert max(v for k, v in diffs.items() if not k.endswith("_agreement")) <= 1e-3
    assert all(diffs[f"{h}_agreement"] == 1.0 for h in HEADS)
