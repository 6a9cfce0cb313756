"""scripts/trial_three_heads.py: the three-head trial runs and reports on validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_script, synthetic_faceset


@pytest.fixture(scope="module")
def th():
    return load_script("trial_three_heads")


def test_expected_age_is_the_mean_of_the_distribution(th):
    logits = torch.full((2, th.N_AGE), -1e4)
    logits[0, 30] = 0.0  # all mass on 30 years
    logits[1, [20, 40]] = 0.0  # half on 20, half on 40
    assert th.expected_age(logits).tolist() == pytest.approx([30.0, 30.0])


def test_trial_runs_and_summarises(th, tmp_path, monkeypatch):
    monkeypatch.setattr(th, "load_prepared", lambda _: synthetic_faceset(80))
    out = tmp_path / "trial"
    args = ["--data", "x", "--out", str(out), "width=0.125", "epochs=2", "batch_size=16",
            "threads=1", "device=cpu", "warmup_epochs=1", "--ema", "0.9"]  # fmt: skip
    assert th.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best_score_epoch"]
    assert best["epoch"] in (1, 2) and 0 <= best["val_age_bin_accuracy"] <= 1
    assert math.isfinite(best["val_age_mae"]) and summary["n_val"] == 8
    assert len((out / "history.csv").read_text().splitlines()) == 3
    from faceattrs.checkpoint import load_model

    model, meta = load_model(out, "best")  # the best epoch's averaged network, three heads
    assert meta["epoch"] == best["epoch"] and set(model.heads) == {"gender", "ethnicity", "age"}
    assert th.main(args) == 2  # never overwrites a trial
