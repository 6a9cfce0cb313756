"""Evaluation, calibration stage, fairness and the evaluate CLI on a tiny random model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import synthetic_faceset

from faceattrs import metrics as M
from faceattrs.bundle import resolve
from faceattrs.calibrate import calibrate_run, load_temperatures
from faceattrs.checkpoint import load_model, save_checkpoint
from faceattrs.cli import main
from faceattrs.dataset import FaceSet
from faceattrs.evaluate import (
    _evaluate_age,
    captions,
    confidence_intervals,
    data_path,
    evaluate_run,
    fairness_cross,
    fairness_report,
)
from faceattrs.exceptions import FaceattrsError
from faceattrs.model import FaceResNet, ModelConfig, predict


def tiny_run(path):
    torch.manual_seed(0)
    save_checkpoint(path, "best", FaceResNet(ModelConfig(width=0.125)), {"epoch": 0, "score": 0.0})
    return path


def split_faces(n: int = 90) -> FaceSet:
    """Synthetic faces where every split holds both genders and all five ethnicities."""
    faces = synthetic_faceset(n)
    faces.split[:] = np.arange(n) % 3
    return faces


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run = tiny_run(tmp_path_factory.mktemp("run"))
    faces = split_faces()
    cal = calibrate_run(run, faces)
    metrics = evaluate_run(run, faces, "test", run / "eval", n_grid=8, min_group=1)
    return run, faces, cal, metrics


def test_metrics_json_has_the_required_numbers(evaluated):
    run, faces, _, m = evaluated
    saved = json.loads((run / "eval" / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "auc", "per_class", "confusion", "ece", "ece_calibrated"):
        assert key in saved["gender"], key
    for key in ("accuracy", "macro_f1", "per_class", "confusion", "ece"):
        assert key in saved["ethnicity"], key
    assert saved["n"] == len(faces.indices("test")) == 30
    assert saved["ci95"]["gender.accuracy"][0] <= saved["gender"]["accuracy"]
    assert np.array(saved["ethnicity"]["confusion"]).shape == (5, 5)
    assert set(saved["ethnicity"]["per_class"]["Indian"]) == {
        "precision",
        "recall",
        "f1",
        "support",
    }


def test_metrics_agree_with_an_independent_recount(evaluated):
    run, faces, _, m = evaluated
    model, _ = load_model(run)
    test = faces.subset("test")
    logits = predict(model, test.images)
    for head in ("gender", "ethnicity"):
        pred, true = logits[head].argmax(1), getattr(test, head)
        assert m[head]["accuracy"] == pytest.approx((pred == true).mean(), abs=1e-4)
        cm = np.array(m[head]["confusion"])
        assert cm.sum() == len(test) and np.trace(cm) == (pred == true).sum()
        support = [v["support"] for v in m[head]["per_class"].values()]
        assert support == np.bincount(true, minlength=cm.shape[0]).tolist()
    npz = np.load(run / "eval" / "predictions.npz")
    assert (npz["index"] == faces.indices("test")).all()


def test_figures_are_written(evaluated):
    run, _, _, m = evaluated
    for name in (
        "confusion_gender",
        "confusion_ethnicity",
        "roc_gender",
        "reliability_gender",
        "reliability_ethnicity",
        "fairness",
        "fairness_by_ethnicity_and_age",
        "selective",
        "faces",
    ):
        path = run / "eval" / m["figures"][name]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_calibration_is_saved_and_never_worse_on_validation(evaluated):
    run, _, cal, m = evaluated
    temps = load_temperatures(run)
    assert temps == cal["temperatures"] and set(temps) == {"gender", "ethnicity"}
    for head, t in temps.items():
        assert t > 0
        val = cal["heads"][head]["val"]
        assert val["nll_after"] <= val["nll_before"] + 1e-4  # T = 1 is inside the search
        assert m[head]["temperature"] == t
    assert (run / "calibration" / "reliability_gender.png").exists()


def test_fairness_by_hand():
    faces = synthetic_faceset(10, split=False)
    faces.gender[:] = [0, 0, 0, 0, 1, 1, 1, 1, 0, 1]
    faces.ethnicity[:] = [0, 0, 1, 1, 0, 0, 1, 1, 3, 3]
    faces.age[:] = [5, 5, 25, 25, 25, 25, 70, 70, 25, 25]
    pred = {"gender": faces.gender.copy(), "ethnicity": faces.ethnicity.copy()}
    pred["gender"][[2, 3]] = 1  # both Black males wrong
    pred["ethnicity"][6] = 0  # one Black female called White
    f = fairness_report(faces, pred, min_size=2)
    by_eth = f["gender_accuracy"]["by_ethnicity"]
    # gender right for White 4/4, Black 2/4 (the two males wrong), Indian 2/2
    assert by_eth["groups"]["White"]["value"] == 1.0 and by_eth["groups"]["Black"]["value"] == 0.5
    assert by_eth["max_gap"] == 0.5 and by_eth["gap_between"] == ["Black", "White"]
    # ethnicity recall among females: White 2/2, Black 1/2, Indian 1/1 -> mean 0.8333
    assert f["ethnicity_recall"]["by_gender"]["groups"]["Female"]["value"] == pytest.approx(0.8333)
    assert f["gender_accuracy"]["by_age_group"]["groups"]["20-29"]["n"] == 6


def test_age_standardised_gap_removes_what_the_share_of_children_explains():
    # White: 2 children (one gender right) + 3 adults (all right) -> 0.8
    # Black: 4 children (two right) + 1 adult (right) -> 0.6; crude gap 0.2
    faces = synthetic_faceset(10, split=False)
    faces.ethnicity[:] = [0] * 5 + [1] * 5
    faces.age[:] = [5, 5, 30, 30, 30, 5, 5, 5, 5, 30]
    faces.gender[:] = 0
    pred = {"gender": np.zeros(10, int), "ethnicity": faces.ethnicity.copy()}
    pred["gender"][[1, 5, 6]] = 1
    f = fairness_report(faces, pred, min_size=2)["gender_accuracy"]
    assert f["by_ethnicity"]["max_gap"] == pytest.approx(0.2)
    std = f["by_ethnicity_age_standardised"]
    # children are 6 of the 10 faces: both 0.6 x 0.5 + 0.4 x 1 = 0.7
    assert std["strata"] == {"0-12": 0.6, "13+": 0.4}
    assert std["groups"]["White"]["value"] == pytest.approx(0.7)
    assert std["groups"]["Black"]["value"] == pytest.approx(0.7)
    assert std["max_gap"] == pytest.approx(0.0)
    assert std["groups"]["Black"]["by_stratum"]["0-12"] == {"value": 0.5, "n": 4}
    # a group with no child has no standardised value, and stays out of the gap
    faces.age[5:9] = 30
    std = fairness_report(faces, pred, min_size=2)["gender_accuracy"][
        "by_ethnicity_age_standardised"
    ]
    assert std["groups"]["Black"]["value"] is None and std["max_gap"] is None
    cross = fairness_cross(faces, pred)["gender_accuracy"]
    assert cross["rows"][:2] == ["White", "Black"] and cross["cols"][0] == "0-12"
    assert cross["n"][0][0] == 2 and cross["value"][0][0] == 0.5
    assert cross["n"][1][0] == 0 and cross["value"][1][0] is None
    assert sum(map(sum, cross["n"])) == 10


def test_cross_tab_counts_every_test_face(evaluated):
    _, faces, _, m = evaluated
    cross = m["fairness_by_ethnicity_and_age"]
    for t in cross.values():
        assert sum(map(sum, t["n"])) == len(faces.subset("test"))


def test_caption_format_matches_the_reference():
    faces = synthetic_faceset(1, split=False)
    faces.gender[:], faces.ethnicity[:] = 1, 0
    probs = {"gender": np.array([[0.02, 0.98]]), "ethnicity": np.array([[0.27, 0.73, 0, 0, 0]])}
    names = {
        "gender": ["Male", "Female"],
        "ethnicity": ["White", "Black", "Asian", "Indian", "Other"],
    }
    assert captions(probs, faces, names) == [
        [
            ("Pred G: Female (0.98) | True: Female", True),
            ("Pred E: Black (0.73) | True: White", False),
        ]
    ]


def test_age_hook_is_called_when_the_run_has_an_age_model(evaluated, tmp_path, monkeypatch):
    import faceattrs.age

    run, faces, _, _ = evaluated
    calls = []

    def fake_evaluate_age(model_dir, faces_, split, out_dir, resamples):
        calls.append((model_dir, split, out_dir, resamples))
        return {"mae": 1.23}

    monkeypatch.setattr(faceattrs.age, "evaluate_age", fake_evaluate_age)
    age_run = tiny_run(tmp_path / "run")
    assert _evaluate_age(resolve(age_run), faces, "test", tmp_path / "out") is None and not calls
    (age_run / "age").mkdir()  # an empty folder is not an age model
    assert _evaluate_age(resolve(age_run), faces, "test", tmp_path / "out") is None and not calls
    # what `train-age` writes, in short
    short = {"format": "faceattrs-age-1", "edges": [16, 26, 29, 37, 53], "clip": [1, 116]}
    (age_run / "age" / "age.json").write_text(json.dumps(short))
    m = evaluate_run(age_run, faces, "test", tmp_path / "out", n_grid=2)
    assert m["age"] == {"mae": 1.23} and calls[0][1:] == ("test", tmp_path / "out" / "age", 1000)
    assert calls[0][0] == age_run / "age"


def test_data_defaults_to_the_runs_config(tmp_path):
    tiny_run(tmp_path)
    with pytest.raises(FaceattrsError, match="--data"):
        data_path(tmp_path, None)
    (tmp_path / "config.json").write_text(json.dumps({"data": "prepared"}))
    (tmp_path / "prepared").mkdir()
    assert data_path(tmp_path, None) == tmp_path / "prepared"
    assert str(data_path(tmp_path, "x.csv")) == "x.csv"


def write_csv(path, faces: FaceSet) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["age", "ethnicity", "gender", "img_name", "pixels"])
        for i in range(len(faces)):
            pixels = " ".join(map(str, faces.images[i].ravel()))
            w.writerow([faces.age[i], faces.ethnicity[i], faces.gender[i], faces.names[i], pixels])


def test_cli_split_all_evaluates_every_row_of_an_external_csv(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    faces = synthetic_faceset(30, seed=3, split=False)
    faces.images[29] = faces.images[28]  # an exact duplicate: --split all must keep it
    write_csv(tmp_path / "external.csv", faces)
    out = tmp_path / "eval_external"
    rc = main(
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(tmp_path / "external.csv"),
            "--split",
            "all",
            "--out",
            str(out),
            "--grid",
            "4",
        ]
    )
    assert rc == 0 and str(out / "metrics.json") in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "all" and m["n"] == 30
    assert sum(v["support"] for v in m["ethnicity"]["per_class"].values()) == 30
    assert (out / "faces.png").exists() and (out / "confusion_ethnicity.png").exists()


def test_intervals_hold_each_reported_figure():
    # 1,000 faces whose gender is right with a probability that depends on ethnicity and
    # age (children harder), as a real model's is
    rng = np.random.default_rng(0)
    sub = synthetic_faceset(1000, split=False)
    p_right = np.array([0.9, 0.95, 0.85, 0.9, 0.8])[sub.ethnicity] - 0.2 * (sub.age < 13)
    right = rng.random(1000) < p_right
    logits = {
        "gender": np.eye(2)[np.where(right, sub.gender, 1 - sub.gender)]
        + rng.normal(0, 0.3, (1000, 2)),
        "ethnicity": np.eye(5)[
            np.where(rng.random(1000) < 0.8, sub.ethnicity, rng.integers(0, 5, 1000))
        ],
    }
    pred = {h: z.argmax(1) for h, z in logits.items()}
    fair = fairness_report(sub, pred)
    ci = confidence_intervals(sub, logits, ["gender", "ethnicity"], 1000, fairness=fair)
    assert ci["level"] == 0.95 and ci["resamples"] == 1000
    figures = {
        "gender.accuracy": M.accuracy(sub.gender, pred["gender"]),
        "gender.macro_f1": M.classification_report(sub.gender, pred["gender"], "MF")["macro_f1"],
        "gender.auc": M.binary_roc(sub.gender, logits["gender"][:, 1] - logits["gender"][:, 0])["auc"],
        "ethnicity.accuracy": M.accuracy(sub.ethnicity, pred["ethnicity"]),
        "fairness.gender_accuracy.by_ethnicity.max_gap": fair["gender_accuracy"]["by_ethnicity"]["max_gap"],
        "fairness.gender_accuracy.by_ethnicity_age_standardised.max_gap": fair["gender_accuracy"][
            "by_ethnicity_age_standardised"
        ]["max_gap"],
    }  # fmt: skip
    for key, value in figures.items():
        low, high = ci[key]
        assert low < value < high, key
        # about +-2 standard errors: 0.02-0.03 for an accuracy of 1,000 faces, about 0.1
        # for a difference between two groups of 200
        assert (high - low) / 2 < (0.035 if "gap" not in key else 0.12), key
    assert ci["gender.accuracy"][1] - ci["gender.accuracy"][0] > 0.03


def test_cli_bootstrap_option(tmp_path, capsys, caplog):
    run = tiny_run(tmp_path / "run")
    faces = synthetic_faceset(30, seed=3, split=False)
    write_csv(tmp_path / "d.csv", faces)
    base = ["evaluate", "--model", str(run), "--data", str(tmp_path / "d.csv"), "--split", "all"]
    for bad in ("-1", "10"):
        assert main([*base, "--out", str(tmp_path / "x"), "--bootstrap", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "--bootstrap must be 0 (none) or at least 100" in err and len(err.splitlines()) == 1
    out = tmp_path / "none"
    with caplog.at_level("INFO", logger="faceattrs.evaluate"):
        assert main([*base, "--out", str(out), "--grid", "0", "--bootstrap", "0"]) == 0
        assert "ci95" not in json.loads((out / "metrics.json").read_text())
        assert "intervals" not in caplog.text and "gender acc" in caplog.text
        caplog.clear()
        assert main([*base, "--out", str(tmp_path / "ci"), "--grid", "0"]) == 0
    m = json.loads((tmp_path / "ci" / "metrics.json").read_text())
    low, high = m["ci95"]["gender.accuracy"]
    # the summary line shows each figure with its interval
    assert f"gender acc {m['gender']['accuracy']:.4f} ({low:.3f}-{high:.3f})" in caplog.text


def test_cli_reports_a_missing_model_in_one_line(tmp_path, capsys):
    data = tmp_path / "prepared"  # good data: the model is the only thing wrong
    data.mkdir()
    np.savez(data / "faces.npz", **split_faces().to_arrays())
    model = tmp_path / "nope"
    rc = main(
        ["evaluate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err == f"faceattrs evaluate: error: model folder {model} does not exist"
    assert not (tmp_path / "x").exists()
    # the model is checked before the data is read: bad data does not hide it
    rc = main(["evaluate", "--model", str(model), "--data", str(tmp_path / "no.csv")])
    assert rc == 2
    assert capsys.readouterr().err.strip().endswith(f"model folder {model} does not exist")


def test_calibration_never_reads_the_test_split(evaluated, monkeypatch):
    """calibrate selects and fits on validation only: the test rows are not even predicted."""
    from faceattrs import calibrate as cal_mod

    run, faces, _, _ = evaluated
    test_rows = {faces.images[i].tobytes() for i in faces.indices("test")}
    seen = []
    real = cal_mod.predict

    def watched(model, images, *a, **k):
        seen.extend(im.tobytes() for im in images)
        return real(model, images, *a, **k)

    monkeypatch.setattr(cal_mod, "predict", watched)
    saved = cal_mod.calibrate_run(run, faces)
    assert seen and not test_rows & set(seen)
    assert set(saved["heads"]["gender"]) == {"val"}
