"""Metrics and calibration against hand-computed values and planted toys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from faceattrs import bundle as B
from faceattrs import calibrate as C
from faceattrs import metrics as M


def test_classification_report_three_classes_by_hand():
    # true 0 0 1 1 2 2 / pred 0 1 1 1 2 0
    r = M.classification_report([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], ["a", "b", "c"])
    assert r["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r["accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    # a: P 1/2 R 1/2 F 1/2; b: P 2/3 R 1 F 0.8; c: P 1 R 1/2 F 2/3
    assert r["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert r["per_class"]["b"]["precision"] == pytest.approx(0.6667)
    assert r["per_class"]["c"]["f1"] == pytest.approx(0.6667)
    assert r["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-4)
    assert r["n"] == 6


def test_binary_roc_perfect_inverted_and_single_class():
    assert M.binary_roc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["auc"] == 1.0
    assert M.binary_roc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1])["auc"] == 0.0
    assert M.binary_roc([1, 1, 1], [0.1, 0.5, 0.9]) is None


def test_softmax_temperature_keeps_argmax_and_flattens():
    z = np.random.default_rng(0).normal(size=(50, 5)) * 3
    p1, p4 = M.softmax(z), M.softmax(z, 4.0)
    np.testing.assert_allclose(p1.sum(1), 1)
    assert (p1.argmax(1) == p4.argmax(1)).all()
    assert (p4.max(1) <= p1.max(1) + 1e-12).all()


def test_per_group_gap_ignores_small_groups():
    true = [1, 1, 1, 1, 0, 0, 0]
    pred = [1, 1, 0, 0, 0, 0, 1]
    groups = ["x", "x", "y", "y", "x", "x", "z"]  # x: 4/4, y: 0/2, z: 0/1 (too small)
    r = M.per_group(M.accuracy, true, pred, groups, order=["z", "x", "y", "w"], min_size=2)
    assert list(r["groups"]) == ["z", "x", "y"]  # order kept, absent "w" skipped
    assert r["groups"]["z"] == {"value": 0.0, "n": 1}
    assert r["max_gap"] == 1.0 and r["gap_between"] == ["y", "x"]
    one = M.per_group(M.accuracy, true, pred, ["x"] * 7)
    assert one["max_gap"] is None


def test_macro_recall_within_group():
    # class 0: 1 of 2 right, class 2: 3 of 3 right -> (0.5 + 1) / 2
    assert M.macro_recall([0, 0, 2, 2, 2], [0, 1, 2, 2, 2]) == 0.75


def test_age_groups_edges_are_half_open():
    groups = M.age_groups([0, 12, 13, 19, 20, 29, 30, 44, 45, 59, 60, 116])
    assert groups.tolist() == [
        "0-12",
        "0-12",
        "13-19",
        "13-19",
        "20-29",
        "20-29",
        "30-44",
        "30-44",
        "45-59",
        "45-59",
        "60+",
        "60+",
    ]


def _calibrated_toy(n: int, seed: int = 0):
    """Binary predictions whose confidence is exactly the probability of being right."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.5, 1.0, n)
    pred = rng.integers(0, 2, n)
    right = rng.random(n) < conf
    y = np.where(right, pred, 1 - pred)
    probs = np.where(pred[:, None] == np.arange(2), conf[:, None], 1 - conf[:, None])
    return probs, y


def test_ece_of_perfectly_calibrated_toy_is_about_zero():
    probs, y = _calibrated_toy(200_000)
    assert C.expected_calibration_error(probs, y) < 0.005


def test_ece_of_overconfident_toy_is_the_gap():
    probs = np.tile([0.9, 0.1], (10, 1))
    y = np.array([0] * 6 + [1] * 4)  # 60 % right at 90 % confidence
    assert C.expected_calibration_error(probs, y) == pytest.approx(0.3)


def test_reliability_bins_cover_every_sample_and_the_top_edge():
    probs, y = _calibrated_toy(1000)
    probs[0] = [1.0, 0.0]
    b = C.reliability_bins(probs, y)
    assert sum(b["count"]) == 1000 and len(b["count"]) == C.N_BINS
    assert b["count"][-1] >= 1  # confidence 1.0 falls in the last bin
    assert len(b["edges"]) == C.N_BINS + 1


def test_fit_temperature_recovers_a_planted_temperature():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(20_000, 5)) * 1.5
    y = np.array([rng.choice(5, p=p) for p in M.softmax(z)])
    overconfident = 3.0 * z
    t = C.fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.05)
    assert C.nll(overconfident, y, t) < C.nll(overconfident, y)
    before = C.expected_calibration_error(M.softmax(overconfident), y)
    after = C.expected_calibration_error(M.softmax(overconfident, t), y)
    assert after < before / 3


def test_load_temperatures_absent_saved_and_stale(tmp_path):
    assert B.read_temperatures(tmp_path) == {}
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "best.safetensors"))  # weights v1
    saved = {"temperatures": {"gender": 1.5}, "weights_sha256": B.weights_id(tmp_path)}
    (tmp_path / "calibration.json").write_text(json.dumps(saved))
    assert B.read_temperatures(tmp_path) == {"gender": 1.5}
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "best.safetensors"))  # retrained
    assert B.read_temperatures(tmp_path) == {}
    probs = C.apply_temperatures({"gender": np.array([[0.0, 3.0]])}, {"gender": 1.5})
    np.testing.assert_allclose(probs["gender"], M.softmax(np.array([[0.0, 2.0]])))
