"""Error clustering: planted clusters are recovered, descriptions follow the measured numbers,
and clusters.json is consistent with the model's own mistakes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import synthetic_faceset
from sklearn.metrics import adjusted_rand_score

from faceattrs import errors as E
from faceattrs.checkpoint import load_model, save_checkpoint
from faceattrs.exceptions import FaceattrsError
from faceattrs.labels import ETHNICITIES
from faceattrs.model import FaceResNet, ModelConfig, predict


def test_kmeans_recovers_three_planted_blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64)) * 10
    planted = np.repeat(np.arange(3), 40)
    emb = centres[planted] + rng.normal(size=(120, 64))
    labels, dist = E.cluster_embeddings(emb, k=3, seed=0)
    assert adjusted_rand_score(planted, labels) == 1.0
    assert dist.shape == (120,) and (dist >= 0).all()
    again, _ = E.cluster_embeddings(emb, k=3, seed=0)
    assert (again == labels).all()


def test_too_few_errors_to_cluster():
    with pytest.raises(FaceattrsError, match="at least k = 3"):
        E.cluster_embeddings(np.zeros((2, 8)), k=3)


def test_descriptions_follow_brightness_and_contrast():
    rng = np.random.default_rng(1)
    dark_contrasty = rng.choice([0, 120], size=(10, 48, 48)).astype(np.uint8)  # mean 60, std 60
    bright_flat = rng.integers(195, 206, size=(10, 48, 48)).astype(np.uint8)  # mean 200, std ~3
    images = np.concatenate([dark_contrasty, bright_flat])
    labels = np.repeat([0, 1], 10)
    true = np.array([3] * 8 + [4] * 2 + [0] * 10)
    pred = np.array([0] * 10 + [2] * 10)
    ref = {k: E._stat(v) for k, v in E.image_stats(images).items()}
    dark, bright = E.describe_clusters(labels, np.zeros(20), images, true, pred, ETHNICITIES, ref)
    assert dark["brightness"]["mean"] == pytest.approx(60, abs=3)
    assert dark["contrast"]["mean"] == pytest.approx(60, abs=1)
    assert dark["description"].startswith("darker") and "high contrast" in dark["description"]
    assert bright["description"].startswith("lighter") and "low contrast" in bright["description"]
    assert dark["true"] == {"Indian": 8, "Other": 2} and dark["predicted"] == {"White": 10}
    assert dark["confusions"] == {"Indian -> White": 8, "Other -> White": 2}
    assert "true mostly Indian (80%)" in dark["description"]
    assert dark["size"] == 10 and dark["share"] == 0.5


def test_cluster_errors_is_consistent_with_the_models_mistakes(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path, "best", FaceResNet(ModelConfig(width=0.125)), {"epoch": 0})
    faces = synthetic_faceset(80)
    faces.split[:] = np.arange(80) % 2 * 2  # half test
    out = E.cluster_errors(tmp_path, faces, tmp_path / "errors", k=3, seed=0, n_examples=4)

    model, _ = load_model(tmp_path)
    test_idx = faces.indices("test")
    pred = predict(model, faces.images[test_idx])["ethnicity"].argmax(1)
    wrong = test_idx[pred != faces.ethnicity[test_idx]]
    assert out["n"] == len(test_idx) and out["n_errors"] == len(wrong)
    assert out["embedding_dim"] == model.embed_dim
    assert sorted(s["index"] for s in out["samples"]) == sorted(wrong.tolist())
    assert sum(c["size"] for c in out["clusters"]) == len(wrong)
    for c in out["clusters"]:
        members = [s for s in out["samples"] if s["cluster"] == c["cluster"]]
        assert len(members) == c["size"] == sum(c["true"].values()) == sum(c["predicted"].values())
        assert all(s["true"] != s["predicted"] for s in members)
        assert set(c["examples"]) <= {s["index"] for s in members} and len(c["examples"]) <= 4
        got = E.image_stats(faces.images[[s["index"] for s in members]])["brightness"].mean()
        assert c["brightness"]["mean"] == pytest.approx(got, abs=0.01)
    saved = json.loads((tmp_path / "errors" / "clusters.json").read_text())
    assert saved["clusters"] == out["clusters"]
    assert len(saved["pca_explained_variance"]) == 2
    assert (tmp_path / "errors" / "montage.png").exists() and (
        tmp_path / "errors" / "pca.png"
    ).exists()
