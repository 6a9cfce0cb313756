"""Metrics and calibration against hand-computed values and planted toys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from faceattrs import bootstrap as BS
from faceattrs import calibrate as C
from faceattrs import metrics as M
from faceattrs import run_folder
from faceattrs.postprocess import softmax


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
    p1, p4 = softmax(z), softmax(z, 4.0)
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
    assert M.expected_calibration_error(probs, y) < 0.005


def test_ece_of_overconfident_toy_is_the_gap():
    probs = np.tile([0.9, 0.1], (10, 1))
    y = np.array([0] * 6 + [1] * 4)  # 60 % right at 90 % confidence
    assert M.expected_calibration_error(probs, y) == pytest.approx(0.3)


def test_reliability_bins_cover_every_sample_and_the_top_edge():
    probs, y = _calibrated_toy(1000)
    probs[0] = [1.0, 0.0]
    b = M.reliability_bins(probs, y)
    assert sum(b["count"]) == 1000 and len(b["count"]) == M.N_BINS
    assert len(b["edges"]) == M.N_BINS + 1
    # bins are (b / n, (b + 1) / n]: a confidence of exactly 1.0 falls in the last bin, one
    # on an inner edge in the bin that edge closes
    top = M.reliability_bins(np.array([[1.0, 0.0]]), np.array([0]))
    assert top["count"] == [0] * (M.N_BINS - 1) + [1]
    assert top["confidence"][-1] == 1.0 and top["accuracy"][-1] == 1.0
    assert top["confidence"][:-1] == [None] * (M.N_BINS - 1)
    edge = M.reliability_bins(np.array([[0.5, 0.5], [0.25, 0.75], [0.8, 0.2]]), np.zeros(3), 4)
    assert edge["count"] == [0, 1, 1, 1] and edge["accuracy"] == [None, 1.0, 0.0, 1.0]


def test_fit_temperature_recovers_a_planted_temperature():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(20_000, 5)) * 1.5
    y = np.array([rng.choice(5, p=p) for p in softmax(z)])
    overconfident = 3.0 * z
    t = C.fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.05)
    assert C.nll(overconfident, y, t) < C.nll(overconfident, y)
    before = M.expected_calibration_error(softmax(overconfident), y)
    after = M.expected_calibration_error(softmax(overconfident, t), y)
    assert after < before / 3


def test_load_temperatures_absent_saved_and_stale(tmp_path):
    assert run_folder.read_temperatures(tmp_path) == {}
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "best.safetensors"))  # weights v1
    saved = {"temperatures": {"gender": 1.5}, "weights_sha256": run_folder.weights_id(tmp_path)}
    (tmp_path / "calibration.json").write_text(json.dumps(saved))
    assert run_folder.read_temperatures(tmp_path) == {"gender": 1.5}
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "best.safetensors"))  # retrained
    assert run_folder.read_temperatures(tmp_path) == {}
    probs = C.apply_temperatures({"gender": np.array([[0.0, 3.0]])}, {"gender": 1.5})
    np.testing.assert_allclose(probs["gender"], softmax(np.array([[0.0, 2.0]])))


# ---------------------------------------------------------------- bootstrap intervals


def _toy(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    p = np.where(rng.random(n) < 0.7, y, rng.integers(0, 5, n))
    p[p == 4] = 3  # class 4 never predicted: sklearn's macro-F1 counts it as F1 0
    return rng, y, p


def test_vectorised_statistics_equal_the_reported_figures_on_the_whole_sample():
    from sklearn.metrics import f1_score, roc_auc_score

    rng, y, p = _toy()
    assert BS.boot_accuracy(y, p) == pytest.approx(M.accuracy(y, p), abs=1e-4)
    assert BS.boot_macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)
    # a batch reduces each row on its own: a resample of the faces, and a row in which
    # classes 3 and 4 never occur (sklearn leaves them out of its mean)
    idx = rng.integers(0, len(y), len(y))
    y2, p2 = np.minimum(y, 2), np.minimum(p, 2)
    batch = BS.boot_macro_f1(np.stack([y, y[idx], y2]), np.stack([p, p[idx], p2]))
    want = [f1_score(a, b, average="macro") for a, b in [(y, p), (y[idx], p[idx]), (y2, p2)]]
    assert batch.shape == (3,) and batch == pytest.approx(want, abs=1e-12)
    assert len(set(np.round(want, 6))) == 3  # three different figures
    g = rng.integers(0, 2, len(y))
    score = np.round(rng.random(len(y)), 1)  # ties, averaged as roc_auc_score does
    assert BS.boot_auc(g, score) == pytest.approx(roc_auc_score(g, score), abs=1e-12)
    age, pred = rng.integers(1, 90, len(y)).astype(float), rng.normal(40, 15, len(y))
    assert BS.boot_mae(age, pred) == pytest.approx(np.abs(age - pred).mean())
    assert BS.boot_cs(age, pred) == pytest.approx((np.abs(age - pred) <= 5).mean())
    # the pair gaps equal per_group's and standardised's largest gaps, for their pair
    correct = (y == p).astype(np.int8)
    group = rng.integers(0, 5, len(y))
    stratum = (rng.random(len(y)) < 0.2).astype(int)
    ones = np.ones(len(y), int)
    crude = M.per_group(M.accuracy, correct, ones, group)
    low, high = (int(g) for g in crude["gap_between"])
    assert BS.boot_pair_gap(low, high)(correct, group) == pytest.approx(crude["max_gap"], abs=2e-4)
    std = M.standardised(M.accuracy, correct, ones, group, stratum)
    low, high = (int(g) for g in std["gap_between"])
    assert BS.boot_standardised_pair_gap(low, high)(correct, group, stratum) == pytest.approx(
        std["max_gap"], abs=2e-4
    )
    assert np.isnan(BS.boot_pair_gap(0, 5)(correct, group))  # no group 5: undefined


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_faces():
    _, y, p = _toy(200)
    small = BS.bootstrap_ci(BS.boot_accuracy, y, p, resamples=500)
    _, y4, p4 = _toy(3200, seed=1)
    large = BS.bootstrap_ci(BS.boot_accuracy, y4, p4, resamples=500)
    assert small[0] < M.accuracy(y, p) < small[1]
    assert large[0] < M.accuracy(y4, p4) < large[1]
    # the width falls about as 1/sqrt(n): 16x the faces, about a quarter of the width
    ratio = (large[1] - large[0]) / (small[1] - small[0])
    assert 0.15 < ratio < 0.4
    # about 95 % of the resampled accuracies of a 0.7 coin lie in the interval: the
    # normal approximation's half-width is 1.96 * sqrt(0.7 * 0.3 / n)
    half = 1.96 * np.sqrt(M.accuracy(y4, p4) * (1 - M.accuracy(y4, p4)) / len(y4))
    assert (large[1] - large[0]) / 2 == pytest.approx(half, rel=0.15)
    # seeded: the same interval twice; undefined statistic -> None
    assert BS.bootstrap_ci(BS.boot_accuracy, y, p, resamples=500) == small
    assert (
        BS.bootstrap_ci(BS.boot_pair_gap(0, 1), (y == p).astype(int), np.zeros(len(y), int)) is None
    )


def test_largest_gap_names_two_groups_even_when_all_are_equal():
    r = M.per_group(M.accuracy, [1, 1, 1, 1], [1, 1, 1, 1], ["a", "a", "b", "b"])
    assert r["max_gap"] == 0.0 and r["gap_between"] == ["a", "b"]
    one = M.per_group(M.accuracy, [1, 1], [1, 1], ["a", "a"])
    assert one["max_gap"] is None and one["gap_between"] is None


def test_selective_accuracy_against_a_brute_force_count():
    rng = np.random.default_rng(3)
    n = 300
    y = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3)) + 2.0 * np.eye(3)[y] * rng.random((n, 1))
    probs = softmax(logits)
    r = M.selective(y, probs, (1.0, 0.8, 0.5, 0.1))
    conf = probs.max(1)
    for a in r["at"]:
        k = int(np.ceil(a["coverage"] * n))
        kept = np.argsort(-conf, kind="stable")[:k]
        assert a["n"] == k
        assert a["accuracy"] == pytest.approx((probs[kept].argmax(1) == y[kept]).mean(), abs=1e-4)
        assert a["threshold"] == pytest.approx(conf[kept].min(), abs=1e-4)
    assert r["at"][0]["accuracy"] == pytest.approx(M.accuracy(y, probs.argmax(1)), abs=1e-4)
    thresholds = [a["threshold"] for a in r["at"]]
    assert thresholds == sorted(thresholds)  # fewer faces answered, a higher bar
    # the planted signal makes confident faces more often right
    assert r["at"][-1]["accuracy"] > r["at"][0]["accuracy"] + 0.1
    curve = r["curve"]
    assert len(curve["coverage"]) <= 101 and curve["coverage"][-1] == 1.0
    assert curve["accuracy"][-1] == r["at"][0]["accuracy"]
