"""`faceattrs run`: every stage in order on a tiny CSV, ending with a report whose links
resolve."""

from __future__ import annotations

import re

from conftest import tiny_csv

from faceattrs.cli import main


def test_run_every_stage_writes_report(tmp_path):
    csv = tiny_csv(tmp_path)
    out = tmp_path / "run"
    args = ["run", "--data", str(csv), "--out", str(out), "--preset", "cpu", "--no-progress"]
    args += ["epochs=1", "width=0.125", "batch_size=16", "max_batches=2"]
    for kv in (
        "head_epochs=1",
        "finetune_epochs=1",
        "max_batches=2",
        "reg_epochs=2",
        "direct=false",
    ):
        args += ["--age-set", kv]
    assert main(args) == 0
    for f in ("data/faces.npz", "best.json", "history.csv", "calibration.json",
              "age/age.json", "eval/metrics.json", "errors/clusters.json", "report.html"):  # fmt: skip
        assert (out / f).exists(), f
    html = (out / "report.html").read_text()
    for href in re.findall(r'href="([^"#][^"]*)"', html):
        if not href.startswith(("data:", "http")):
            assert (out / href).exists(), href


def test_run_with_the_age_head_skips_the_two_stage_model(tmp_path):
    import json

    out = tmp_path / "run"
    args = ["run", "--data", str(tiny_csv(tmp_path)), "--out", str(out), "--preset", "cpu",
            "--no-progress", "epochs=1", "width=0.125", "batch_size=16", "max_batches=2",
            "age_head=true"]  # fmt: skip
    assert main(args) == 0
    age = json.loads((out / "age" / "age.json").read_text())
    assert age["direct"] == "multitask" and not (out / "age" / "coarse.json").exists()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["age"]["approach"] == "direct" and metrics["age"]["mae"] > 0
    assert (out / "report.html").exists()
