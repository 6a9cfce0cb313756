"""tools/compare_backends.py: the same metrics through PyTorch and an ONNX export, judged
by a rule's bars."""

from __future__ import annotations

import json

import pytest
from conftest import load_script, tiny_csv

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from predict_helpers import make_run

    from faceattrs.export import export_onnx

    root = tmp_path_factory.mktemp("cmp")
    run = make_run(root / "run")
    export_onnx(run, root / "onnx")
    return run, root / "onnx", tiny_csv(root)


def rule(path, bars):
    path.write_text(json.dumps({"bars": bars}))
    return str(path)


def test_fp32_export_matches_torch_and_meets_its_bars(setup, tmp_path, capsys):
    run, onnx, csv = setup
    cb = load_script("compare_backends")
    bars = [{"measure": m, "max_drop": 0.0} for m in ("gender_accuracy", "age_bin_accuracy")]
    bars.append({"measure": "age_mae", "max_rise": 0.01})
    argv = ["--model", str(run), "--data", str(csv), "--out", str(tmp_path), str(onnx)]
    assert cb.main([*argv, "--rule", rule(tmp_path / "r.json", bars)]) == 0
    res = json.loads((tmp_path / "compare.json").read_text())
    torch_row, onnx_row = res["backends"]["torch-fp32"], res["backends"][str(onnx)]
    assert res["split"] == "val" and res["n"] > 0
    for m in cb.MEASURES:  # an fp32 export: the same numbers
        assert onnx_row[m] == pytest.approx(torch_row[m], abs=1e-3), m
    assert onnx_row["gender_same_class"] >= 0.98 and onnx_row["precision"] == "fp32"
    assert res["verdicts"][str(onnx)]["met"] is True
    assert "every bar met" in capsys.readouterr().out


def test_a_missed_bar_exits_1_and_bad_input_2(setup, tmp_path, capsys):
    run, onnx, csv = setup
    cb = load_script("compare_backends")
    argv = ["--model", str(run), "--data", str(csv), str(onnx)]
    impossible = [{"measure": "gender_accuracy", "max_drop": -0.5}]  # asks a gain of 0.5
    assert cb.main([*argv, "--rule", rule(tmp_path / "r.json", impossible)]) == 1
    assert "MISSED" in capsys.readouterr().out
    for bad, msg in (
        ([{"measure": "speed", "max_drop": 0}], "unknown measure"),
        ([{"measure": "age_mae"}], "max_drop or max_rise"),
        ([], "non-empty"),
    ):
        assert cb.main([*argv, "--rule", rule(tmp_path / "b.json", bad)]) == 2
        assert msg in capsys.readouterr().err
    assert cb.main(["--model", str(run), "--data", str(tmp_path / "nope.csv"), str(onnx)]) == 2
    assert cb.main(["--model", str(run), "--data", str(csv), str(tmp_path / "no_export")]) == 2
