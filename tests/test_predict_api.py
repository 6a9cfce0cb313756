"""The analyzer and the Python API (``FaceAnalyzer``, ``faceattrs.analyze``) on tiny
random-init models: records, probabilities, inputs of every kind, batching and streams,
errors. The command line is in test_predict_cli.py, the photo-worker processes in
test_photo_workers.py; ``run_dir`` and ``photos`` are session fixtures in conftest.py."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image
from predict_helpers import compose, make_run

import faceattrs
from faceattrs.checkpoint import CheckpointError, load_model
from faceattrs.exceptions import FaceattrsError
from faceattrs.photo import PhotoError, extract_faces, load_image
from faceattrs.predict import FaceAnalyzer, softmax


@pytest.fixture(scope="module")
def analyzer(run_dir) -> FaceAnalyzer:
    return FaceAnalyzer(run_dir)


def check_record(rec: dict, analyzer: FaceAnalyzer) -> None:
    for head, names in analyzer.models.class_names.items():
        probs = rec[head]["probabilities"]
        assert list(probs) == names and abs(sum(probs.values()) - 1) < 1e-3
        assert probs[rec[head]["label"]] == max(probs.values())  # (rounded: ties possible)
    age = rec["age"]
    assert set(age) == {"value", "bin", "bin_probabilities", "interval"}
    assert 1 <= age["value"] <= 100
    low, high = age["interval"]  # value -/+ the half-width of the predicted bin, cut at 0
    half = dict(zip(["0-16", "16-26", "26-29", "29-37", "37-53", "53+"], range(3, 9), strict=True))[
        age["bin"]
    ]
    want = (max(age["value"] - half, 0.0), age["value"] + half)
    assert (low, high) == pytest.approx(want, abs=0.06)  # each rounded to 0.1 on its own
    assert age["bin_probabilities"][age["bin"]] == max(age["bin_probabilities"].values())
    assert len(rec["box"]) == 4 and rec["face"] >= 0


def test_records_for_every_shared_photo(analyzer, photos):
    recs = analyzer.analyze(photos)
    assert [r["file"] for r in recs] == [str(p) for p in photos]  # one face each, in order
    for r in recs:
        check_record(r, analyzer)


def test_probabilities_are_the_models(analyzer, run_dir, photos):
    """Temperature-scaled softmax of the multitask model's logits, age from the age model."""
    from faceattrs.bundle import load_age_model

    faces = np.stack([extract_faces(load_image(p))[0].crop for p in photos[:5]])
    model, _ = load_model(run_dir)
    from faceattrs.model import predict

    logits = predict(model, faces)
    age = load_age_model(run_dir).predict(faces)
    recs = analyzer.analyze(photos[:5])
    for i, r in enumerate(recs):
        g = softmax(logits["gender"][i : i + 1], 2.0)[0]  # calibration.json: T = 2 for gender
        e = softmax(logits["ethnicity"][i : i + 1])[0]
        assert np.allclose(list(r["gender"]["probabilities"].values()), g, atol=1e-4)
        assert np.allclose(list(r["ethnicity"]["probabilities"].values()), e, atol=1e-4)
        assert abs(r["age"]["value"] - age["value"][i]) < 0.051


def test_inputs_of_every_kind_agree(analyzer, photos):
    p = photos[3]
    by_path = analyzer.analyze(p)
    for src in (str(p), load_image(p), Image.open(p), p.read_bytes()):
        rec = analyzer.analyze(src)[0]
        assert rec["gender"] == by_path[0]["gender"] and rec["age"] == by_path[0]["age"]
    assert analyzer.analyze(load_image(p))[0]["file"] is None
    assert faceattrs.analyze(p, model=analyzer.models.source)[0]["gender"] == by_path[0]["gender"]


def test_batching_does_not_change_results(run_dir, photos):
    one = FaceAnalyzer(run_dir, batch_size=1).analyze(photos[:7])
    many = FaceAnalyzer(run_dir, batch_size=5).analyze(photos[:7])
    for a, b in zip(one, many, strict=True):
        for head in ("gender", "ethnicity"):
            pa, pb = a[head]["probabilities"], b[head]["probabilities"]
            assert max(abs(pa[k] - pb[k]) for k in pa) <= 1e-4


def test_streams_give_the_same_records_in_order(run_dir, monkeypatch):
    """Two model streams (the CPU default) and one give the same records, in input order,
    errors included, over several batches; a model failure in a stream is raised."""
    from faceattrs import predict as predict_mod

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60 + i, 50, 3), dtype=np.uint8) for i in range(11)]
    images[4] = b"not an image"
    one = FaceAnalyzer(run_dir, batch_size=2, streams=1)
    two = FaceAnalyzer(run_dir, batch_size=2, streams=2, threads=1)
    a = one.analyze(images, detect=False, on_error="record")
    b = two.analyze(images, detect=False, on_error="record")
    assert [r.get("image") for r in b] == list(range(11)) and "error" in b[4]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for head in ("gender", "ethnicity"):
            if head in ra:
                pa, pb = ra[head]["probabilities"], rb[head]["probabilities"]
                assert max(abs(pa[k] - pb[k]) for k in pa) <= 1e-4
    calls = []

    def broken(faces, pool=None):
        calls.append(len(faces))
        raise RuntimeError("model failed")

    monkeypatch.setattr(two.models, "outputs", broken)
    with pytest.raises(RuntimeError, match="model failed"):
        two.analyze(images[:4], detect=False)
    assert calls  # the failure came from a stream
    assert predict_mod.model_streams("cuda", None, None) == (1, None)
    assert predict_mod.model_streams("cpu", 3, None) == (1, 3)  # threads given: one stream
    assert predict_mod.model_streams("cpu", None, 4)[0] == 4
    for bad in (0, -1, 1.5, True):
        with pytest.raises(FaceattrsError, match="streams must be"):
            FaceAnalyzer(run_dir, streams=bad)


def test_multi_face_image(analyzer, photos):
    recs = analyzer.analyze(compose(photos[:4]))
    assert [r["face"] for r in recs] == [0, 1, 2, 3]
    assert [r["box"][0] for r in recs] == sorted(r["box"][0] for r in recs)
    for r in recs:
        check_record(r, analyzer)


def test_errors_raise_or_become_records(analyzer, photos, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    noise = cv2.GaussianBlur(np.random.default_rng(0).normal(0, 1, (300, 400)), (0, 0), 6)
    with pytest.raises(PhotoError, match="not an image"):
        analyzer.analyze([photos[0], bad])
    with pytest.raises(PhotoError, match="no face found"):
        analyzer.analyze(cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8))
    recs = analyzer.analyze([photos[0], bad, photos[1]], on_error="record")
    assert [("error" in r) for r in recs] == [False, True, False]
    assert [r["image"] for r in recs] == [0, 1, 2]  # the position in the input, paths too
    assert recs[1] == {
        "file": str(bad),
        "image": 1,
        "error": f"{bad}: not an image (or a format Pillow cannot read)",
    }


def test_no_detect_and_lists_of_arrays(analyzer, photos):
    imgs = [load_image(p) for p in photos[:3]]
    recs = analyzer.analyze(imgs, detect=False)
    assert [r["image"] for r in recs] == [0, 1, 2]
    assert all(r["box"] == [0, 0, 200, 200] and r["detection"] == "given" for r in recs)


def test_without_age_model_age_is_null(tmp_path, photos):
    recs = FaceAnalyzer(make_run(tmp_path, age=False)).analyze(photos[:2])
    assert all(r["age"] is None for r in recs)


def test_bf16_gives_close_probabilities(run_dir, photos):
    a = FaceAnalyzer(run_dir).analyze(photos[:3])
    b = FaceAnalyzer(run_dir, dtype="bf16").analyze(photos[:3])
    for ra, rb in zip(a, b, strict=True):
        pa, pb = ra["ethnicity"]["probabilities"], rb["ethnicity"]["probabilities"]
        assert max(abs(pa[k] - pb[k]) for k in pa) < 0.05


def test_model_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        FaceAnalyzer(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a model folder"):
        FaceAnalyzer(tmp_path)
    run = make_run(tmp_path / "run", age=False)
    (run / "best.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights missing"):
        FaceAnalyzer(run)
    run = make_run(tmp_path / "run2", age=False)
    meta = json.loads((run / "best.json").read_text())
    meta["model"]["width"] = 0.25  # settings that do not match the weights
    (run / "best.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="match its settings"):
        FaceAnalyzer(run)
    monkeypatch.setattr("faceattrs.bundle.DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(FaceattrsError, match=r"faceattrs run --data CSV --out RUN --preset cpu"):
        FaceAnalyzer()


def test_default_model_is_used_when_bundled(tmp_path, monkeypatch, photos):
    monkeypatch.setattr("faceattrs.bundle.DEFAULT_MODEL_DIR", make_run(tmp_path, age=False))
    assert len(FaceAnalyzer().analyze(photos[0])) == 1


def test_import_stays_light():
    code = "import sys, faceattrs; assert 'torch' not in sys.modules and 'cv2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert faceattrs.FaceAnalyzer is FaceAnalyzer and callable(faceattrs.analyze)
    with pytest.raises(AttributeError):
        faceattrs.no_such_name  # noqa: B018


def test_bad_analyze_options_are_one_clear_error(analyzer):
    face = np.full((48, 48), 128, np.uint8)
    with pytest.raises(FaceattrsError, match="detect must be True or False, got 'maybe'"):
        analyzer.analyze(face, detect="maybe")
    with pytest.raises(FaceattrsError, match="on_error must be"):
        analyzer.analyze(face, on_error="ignore")
    assert analyzer.analyze(face, detect=False)[0]["detection"] == "given"


def test_an_unbounded_interval_end_is_null_in_strict_json():
    """A model calibrated on too few validation faces has an infinite half-width: the
    record says null for that end, and the record is valid (strict) JSON."""
    import json
    from types import SimpleNamespace

    from faceattrs.predict import face_predictions

    def outputs(faces, pool=None):
        n = len(faces)
        age = {
            "value": np.array([30.0, 50.0]),
            "bin": np.array([0, 1]),
            "bin_probabilities": np.array([[0.9, 0.1], [0.2, 0.8]]),
            "interval": (np.array([25.0, 0.0]), np.array([35.0, np.inf])),
        }
        return {"gender": np.zeros((n, 2))}, age

    models = SimpleNamespace(
        outputs=outputs, class_names={"gender": ["Male", "Female"]}, temperatures={},
        bin_labels=["0-40", "40+"],
    )  # fmt: skip
    recs = face_predictions(models, np.zeros((2, 48, 48), np.uint8))
    assert [r["age"]["interval"] for r in recs] == [[25.0, 35.0], [0.0, None]]
    json.dumps(recs, allow_nan=False)  # raises on inf / nan
