"""tools/check_rule.py: a candidate judged by bars written down before its data, on the
validation split, against the incumbent measured in the same run."""

from __future__ import annotations

import json

import pytest
from conftest import load_script, tiny_csv

from faceattrs.cli import main as faceattrs


@pytest.fixture(scope="module")
def cr():
    return load_script("check_rule")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A prepared tiny CSV and two one-epoch three-head runs on it (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("rule")
    prep = root / "prep"
    assert faceattrs(["prepare", "--data", str(tiny_csv(root)), "--out", str(prep)]) == 0
    out = []
    for seed in (0, 1):
        run = root / f"s{seed}"
        args = ["train", "--data", str(prep), "--out", str(run), "--preset", "cpu",
                "--no-progress", "epochs=1", "width=0.125", "batch_size=16", "max_batches=2",
                "age_head=true", f"seed={seed}", "threads=1"]  # fmt: skip
        assert faceattrs(args) == 0
        out.append(run)
    return prep, out


def rule_file(path, bars):
    # the incumbent: the bundled 48x48 model (the test's faces are 48x48 gray)
    rule = {"name": "test rule", "written": "before", "incumbent": "utk48", "bars": bars}
    path.write_text(json.dumps(rule))
    return path


def test_a_met_rule_adopts_and_records_what_it_measured(cr, runs, tmp_path, capsys):
    prep, (a, b) = runs
    rule = rule_file(tmp_path / "rule.json", [
        {"measure": "score", "op": ">=", "value": 0.0},
        {"measure": "age_mae", "op": "<=", "value": 200.0},
        {"measure": "latency_ms", "op": "<=", "value": 1e6},
    ])  # fmt: skip
    out = tmp_path / "cand"
    args = ["--rule", str(rule), "--data", str(prep), "--out", str(out), "--repeats", "1"]
    assert cr.main([*args, str(a), str(b)]) == 0
    record = json.loads((out / "verdict.json").read_text())
    assert record["verdict"] == "adopt" and all(r["met"] for r in record["bars"])
    cand, inc = record["measures"]["candidate"], record["measures"]["incumbent"]
    # the values are the validation files' own: the candidate's metrics and calibration
    metrics = json.loads((out / "val" / "metrics.json").read_text())
    assert metrics["split"] == "val" and cand["age_mae"] == metrics["age"]["mae"]
    calib = json.loads((out / "model" / "calibration.json").read_text())
    choice = "flip" if calib["flip_tta"] else "plain"
    assert cand["score"] == calib["flip_tta_selection"]["val_score"][choice]
    assert json.loads((out / "model" / "best.json").read_text())["model"]["members"] == 2
    # the incumbent (the bundled model) was evaluated on the same validation faces
    inc_metrics = json.loads((out / "incumbent_val" / "metrics.json").read_text())
    assert inc["age_mae"] == inc_metrics["age"]["mae"] and inc_metrics["n"] == metrics["n"]
    # its score is this run's (mean macro-F1 on these faces), not its calibration.json's
    # (0.8384, from the real validation split)
    f1 = (inc_metrics["gender"]["macro_f1"] + inc_metrics["ethnicity"]["macro_f1"]) / 2
    assert inc["score"] == pytest.approx(f1, abs=1e-4) and inc["score"] != 0.8384
    assert cand["latency_ms"] > 0 and inc["latency_ms"] > 0
    # beside the verdict: candidate - incumbent on the same faces, with a paired interval
    diffs = record["differences"]
    assert set(diffs) == {"score", "gender_accuracy", "ethnicity_macro_f1", "age_mae"}
    for name, key in (("gender_accuracy", ("gender", "accuracy")),
                      ("ethnicity_macro_f1", ("ethnicity", "macro_f1"))):  # fmt: skip
        want = metrics[key[0]][key[1]] - inc_metrics[key[0]][key[1]]
        assert diffs[name]["difference"] == pytest.approx(want, abs=2e-4), name
    assert diffs["age_mae"]["difference"] == pytest.approx(
        metrics["age"]["mae"] - inc_metrics["age"]["mae"], abs=2e-3
    )
    for name, d in diffs.items():
        low, high = d["ci95"]
        assert low - 1e-4 <= d["difference"] <= high + 1e-4 and low <= high, name
    printed = capsys.readouterr().out
    assert "verdict: adopt" in printed and "paired bootstrap interval" in printed
    assert cr.main([*args, str(a), str(b)]) == 2  # never reuses a candidate folder


def test_a_missed_bar_rejects(cr, runs, tmp_path, capsys):
    prep, (a, b) = runs
    rule = rule_file(tmp_path / "rule.json", [
        {"measure": "score", "op": ">=", "value": 0.0},
        {"measure": "age_bin_accuracy", "op": ">=", "value": 1.01},  # cannot be met
    ])  # fmt: skip
    out = tmp_path / "cand"
    args = ["--rule", str(rule), "--data", str(prep), "--out", str(out), "--incumbent", str(b)]
    assert cr.main([*args, str(a)]) == 1  # one run: copied, calibrated, judged alone
    record = json.loads((out / "verdict.json").read_text())
    assert record["verdict"] == "not adopted" and [r["met"] for r in record["bars"]] == [
        True,
        False,
    ]
    assert record["incumbent"] == str(b) and "MISSED" in capsys.readouterr().out
    # an uncalibrated incumbent's score is the same mean macro-F1, from its metrics
    inc = json.loads((out / "incumbent_val" / "metrics.json").read_text())
    want = (inc["gender"]["macro_f1"] + inc["ethnicity"]["macro_f1"]) / 2
    assert record["measures"]["incumbent"]["score"] == pytest.approx(want, abs=1e-4)


def test_within_the_incumbent_counts_only_when_the_incumbent_misses_too(cr):
    bar = {"measure": "latency_ms", "op": "<=", "value": 20.0, "or_within_incumbent": 1.05}
    [row] = cr.judge([bar], {"latency_ms": 21.5}, {"latency_ms": 21.0})
    assert row["met"] and row["judged_by"].startswith("within")
    [row] = cr.judge([bar], {"latency_ms": 22.5}, {"latency_ms": 21.0})  # over 1.05x
    assert not row["met"]
    [row] = cr.judge([bar], {"latency_ms": 20.5}, {"latency_ms": 19.0})  # v5 meets it: bar
    assert not row["met"] and row["judged_by"] == "bar"
    up = {"measure": "score", "op": ">=", "value": 0.9, "or_within_incumbent": 1.01}
    assert cr.judge([up], {"score": 0.89}, {"score": 0.895})[0]["met"]
    assert not cr.judge([up], {"score": 0.88}, {"score": 0.895})[0]["met"]


@pytest.mark.parametrize(
    "text, why",
    [
        ("{", "not a readable JSON rule"),
        ('{"bars": []}', "non-empty list"),
        ('{"bars": [{"measure": "speed", "op": "<=", "value": 1}]}', "measure must be"),
        ('{"bars": [{"measure": "age_mae", "op": "<", "value": 1}]}', "needs op"),
    ],
)
def test_a_bad_rule_is_one_line_and_exit_2(cr, tmp_path, capsys, text, why):
    rule = tmp_path / "rule.json"
    rule.write_text(text)
    args = ["--rule", str(rule), "--data", "x", "--out", str(tmp_path / "c"), "run"]
    assert cr.main(args) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_a_failed_check_leaves_no_folder(cr, runs, tmp_path, capsys):
    prep, (a, _) = runs
    rule = rule_file(tmp_path / "rule.json", [{"measure": "score", "op": ">=", "value": 0}])
    out = tmp_path / "cand"
    base = ["--rule", str(rule), "--data", str(prep), "--out", str(out)]
    assert cr.main([*base, str(tmp_path / "nothing")]) == 2  # a missing run: before any work
    assert "no such run folder" in capsys.readouterr().err and not out.exists()
    # an incumbent that cannot be evaluated: the candidate made so far is removed
    assert cr.main([*base, "--incumbent", str(tmp_path / "nothing"), str(a)]) == 2
    assert "exit 2" in capsys.readouterr().err and not out.exists()


def test_the_pending_rule_parses(cr):
    rule = cr.read_rule(cr.REPO / "docs" / "results" / "rules" / "age-bin-seeds-2-3.json")
    assert {b["measure"] for b in rule["bars"]} == {
        "score", "age_bin_accuracy", "age_mae", "gender_gap", "latency_ms"}  # fmt: skip
