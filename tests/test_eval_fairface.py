"""tools/eval_fairface.py: age groups, the central face, the summary and its table."""

from __future__ import annotations

import doctest

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def ev():
    return load_script("eval_fairface")


def test_doctests(ev):
    assert doctest.testmod(ev).failed == 0


def test_summary_counts_missing_faces_as_wrong(ev, tmp_path):
    rows = [
        {
            "gender": "Male",
            "age": "20-29",
            "faces": 1,
            "pred_gender": "Male",
            "pred_group": "20-29",
        },
        {
            "gender": "Male",
            "age": "20-29",
            "faces": 1,
            "pred_gender": "Female",
            "pred_group": "30-39",
        },
        {"gender": "Female", "age": "70+", "faces": 0},
        {
            "gender": "Female",
            "age": "70+",
            "faces": 2,
            "pred_gender": "Female",
            "pred_group": "0-2",
        },
    ]
    res = ev.summarise(rows)
    assert res["overall"]["found"] == 0.75 and res["overall"]["gender_acc"] == 0.5
    assert res["overall"]["gender_acc_found"] == pytest.approx(2 / 3)
    assert res["overall"]["age_acc"] == 0.25 and res["overall"]["age_within_one_group"] == 0.5
    assert res["by_age_gender"]["70+ Female"]["found"] == 0.5
    assert res["age_confusion"]["rows_true_cols_pred"][3][4] == 1
    md = ev.table(res)
    assert md.count("\n") == 2 + 9 + 1 and "| **all** | 4 | 75.0 | 50.0 |" in md
    ev.plot(res, tmp_path / "f.png", "test")
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert "gender_selective" not in res  # no probabilities recorded


def test_summary_answers_the_confident_photos_first(ev):
    rows = [  # p(Female) 0.9 right, 0.2 right, 0.6 wrong (a man called Female)
        {"gender": "Female", "age": "20-29", "faces": 1, "pred_gender": "Female", "p_female": 0.9},
        {"gender": "Male", "age": "20-29", "faces": 1, "pred_gender": "Male", "p_female": 0.2},
        {"gender": "Male", "age": "20-29", "faces": 1, "pred_gender": "Female", "p_female": 0.6},
        {"gender": "Female", "age": "70+", "faces": 0},  # no face: not ranked
    ]
    sel = ev.summarise(rows, {"from": "m.json", "values": [0.5, 0.7, 0.95]})["gender_selective"]
    at = {a["coverage"]: a for a in sel["at"]}
    assert at[1.0]["n"] == 3 and at[1.0]["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert at[0.5]["n"] == 2 and at[0.5]["accuracy"] == 1.0 and at[0.5]["threshold"] == 0.8
    # thresholds read elsewhere: confidences 0.9, 0.8, 0.6
    above = [(r["threshold"], r["n"], r["accuracy"]) for r in sel["above"]["rows"]]
    assert above == [(0.5, 3, pytest.approx(0.6667, abs=1e-4)), (0.7, 2, 1.0), (0.95, 0, None)]


def test_thresholds_from_a_file_without_them_is_one_line(ev, tmp_path, capsys):
    (tmp_path / "m.json").write_text("{}")
    rc = ev.main(
        ["--model", "x", "--data", str(tmp_path), "--thresholds-from", str(tmp_path / "m.json")]
    )
    assert rc == 2 and "no gender.selective" in capsys.readouterr().err


def test_central_face(ev):
    recs = [{"box": [0, 0, 50, 50]}, {"box": [80, 80, 60, 60]}]
    assert ev.central(recs, (224, 224)) is recs[1]


def test_bad_folder_exits_2(ev, tmp_path, capsys):
    assert ev.main(["--model", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "no ground_truth.json" in capsys.readouterr().err
