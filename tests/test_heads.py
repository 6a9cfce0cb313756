"""Heads are data: a model with another head set (3 heads, 7 ethnicity classes) goes
through train one batch -> save -> load -> predict -> export with no library change; a
head added by settings and labels alone trains through ``fit`` and every later stage."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import synthetic_faceset

from faceattrs.backends import TorchBackend
from faceattrs.bundle import resolve
from faceattrs.calibrate import calibrate_run
from faceattrs.checkpoint import save_checkpoint
from faceattrs.errors import cluster_errors
from faceattrs.evaluate import evaluate_run
from faceattrs.inputs import GENDERS, normalise
from faceattrs.model import FaceResNet, ModelConfig, predict
from faceattrs.postprocess import softmax
from faceattrs.predict import FaceAnalyzer
from faceattrs.predict_files import predict_files
from faceattrs.prepare import load_prepared
from faceattrs.serve import ServeConfig
from faceattrs.serve.info import model_info
from faceattrs.training import (
    TrainConfig,
    TrainError,
    evaluate_heads,
    fit,
    history_fields,
    make_optimizer,
    multitask_loss,
    resolve_config,
    resume_settings,
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


# ------------------------------------------------- a head added by config and labels alone


@pytest.fixture(scope="module")
def smile_run(tmp_path_factory):
    """A prepared folder whose faces.npz holds a ``label_smile`` array, and a tiny model
    trained on it through ``fit`` with the head added by overrides only."""

    root = tmp_path_factory.mktemp("smile")
    faces = synthetic_faceset(80, seed=3)
    faces.labels["smile"] = (np.arange(len(faces)) % 3 == 0).astype(np.int8)
    np.savez(root / "faces.npz", **faces.to_arrays())  # a prepared folder, by hand
    faces = load_prepared(root)
    cfg = resolve_config("cpu", [
        "width=0.125", "epochs=2", "batch_size=16", "threads=1", "device=cpu",
        "heads.smile.classes=no,yes", "heads.smile.weight=0.5", "heads.smile.selects=false",
    ])  # fmt: skip
    fit(faces, root / "run", cfg, progress=False)
    return root / "run", faces


def test_a_head_added_by_config_and_labels_trains_end_to_end(smile_run, tmp_path):
    run, faces = smile_run
    assert list(faces.labels) == ["age", "gender", "ethnicity", "smile"]
    b = resolve(run)
    assert b.heads == {"gender": list(GENDERS), "ethnicity": b.heads["ethnicity"],
                       "smile": ["no", "yes"]}  # fmt: skip
    # the history has the head's columns; the score is the mean of the heads that select
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert {"train_loss_smile", "val_smile_accuracy", "val_smile_macro_f1"} <= set(rows[0])
    for r in rows:
        mean = (float(r["val_gender_macro_f1"]) + float(r["val_ethnicity_macro_f1"])) / 2
        assert float(r["val_score"]) == pytest.approx(mean, abs=1e-5)
    assert "smile" in b.meta["val"] and b.meta["monitor"].endswith("(gender, ethnicity)")
    cfg, _ = resume_settings(run, ["epochs=3", "heads.smile.weight=0.25"], data=run.parent)
    assert [(h.name, h.weight, h.selects) for h in cfg.heads][2] == ("smile", 0.25, False)

    cal = calibrate_run(run, faces, flip_tta="off")
    assert set(cal["temperatures"]) == {"gender", "ethnicity", "smile"}
    result = evaluate_run(run, faces, "test", run / "eval", resamples=20, n_grid=4)
    assert np.array(result["smile"]["confusion"]).shape == (2, 2)
    assert result["smile"]["n"] == len(faces.subset("test")) and "smile.macro_f1" in result["ci95"]
    assert (run / "eval" / "confusion_smile.png").exists()
    with np.load(run / "eval" / "predictions.npz") as z:
        np.testing.assert_array_equal(z["smile_true"], faces.subset("test").labels["smile"])
    clusters = cluster_errors(run, faces, tmp_path / "errors", k=1, head="smile")
    assert clusters["head"] == "smile" and clusters["n_errors"] == sum(
        s["true"] != s["predicted"] for s in clusters["samples"]
    )

    images = faces.subset("test").images[:3]
    analyzer = FaceAnalyzer(run)
    recs = analyzer.analyze(list(images), detect=False)
    assert all(list(rec["smile"]["probabilities"]) == ["no", "yes"] for rec in recs)
    info = model_info(analyzer, ServeConfig(model=str(run)))
    assert info["heads"]["smile"] == ["no", "yes"] and "smile" in info["metrics"]["validation"]
    assert "smile" in info["metrics"]["test"]


def test_a_head_without_labels_is_one_line(tmp_path):
    cfg = resolve_config("cpu", ["width=0.125", "epochs=1", "heads.smile.classes=no,yes"])
    with pytest.raises(TrainError, match="no labels for head 'smile'.*label_smile"):
        fit(synthetic_faceset(40), tmp_path / "run", cfg, progress=False)
