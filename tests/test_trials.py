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


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mix_batch_keeps_lambda_of_each_image(th, mode):
    import numpy as np

    x = torch.zeros(6, 3, 48, 48)
    x += torch.arange(6.0).view(6, 1, 1, 1)  # image i is the constant i
    mixed, perm, lam = th.mix_batch(x, mode, 1.0, np.random.default_rng(3))
    assert sorted(perm.tolist()) == list(range(6)) and 0 <= lam <= 1
    # every image is lam x own + (1 - lam) x partner, on average over its pixels
    expected = lam * torch.arange(6.0) + (1 - lam) * perm.float()
    assert mixed.mean((1, 2, 3)).tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    if mode == "cutmix":  # pixels come whole from one image or the other
        assert set(mixed.unique().tolist()) <= set(range(6))


def test_trial_with_cutmix_runs(th, tmp_path, monkeypatch):
    monkeypatch.setattr(th, "load_prepared", lambda _: synthetic_faceset(80))
    out = tmp_path / "mix"
    args = ["--data", "x", "--out", str(out), "--mix", "cutmix", "--mix-prob", "1",
            "width=0.125", "epochs=1", "batch_size=16", "threads=1", "device=cpu"]  # fmt: skip
    assert th.main(args) == 0
    assert json.loads((out / "config.json").read_text())["mix"] == "cutmix"
    assert math.isfinite(json.loads((out / "summary.json").read_text())["best_mae"])


def test_class_offsets_undo_a_known_shift_and_cross_validate(tmp_path, capsys, monkeypatch):
    """scripts/val_class_offsets.py: logits whose rare class was pushed down by 1.5 get an
    offset that brings it back (macro-F1 rises), and the report has its cross-validation."""
    import numpy as np

    vco = load_script("val_class_offsets")
    rng = np.random.default_rng(0)
    y = rng.choice(3, 600, p=[0.5, 0.35, 0.15])
    logits = rng.normal(0, 1, (600, 3)) + 2.5 * np.eye(3)[y]
    logits[:, 2] -= 1.5
    b = vco.fit_offsets(logits, y)
    assert b[0] == 0 and b[2] >= 0.5 and b[2] > b[1]  # the rare class pushed back up
    assert vco.macro_f1(y, logits, b) > vco.macro_f1(y, logits, np.zeros(3)) + 0.02
    np.savez(tmp_path / "p.npz", ethnicity_logits=logits, ethnicity_true=y)
    monkeypatch.setattr("sys.argv", ["x", str(tmp_path / "p.npz"), "--shuffles", "1"])
    vco.main()
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 600 and len(out["cross_validated"]) == 1
    assert out["cross_validated"][0]["macro_f1"] > out["plain"]["macro_f1"]


def test_class_offsets_on_age_bins(tmp_path, capsys, monkeypatch):
    """``--age`` reads the age head's bin probabilities and tunes accuracy."""
    import numpy as np

    vco = load_script("val_class_offsets")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 300)
    probs = rng.dirichlet(np.ones(6), 300) + 0.5 * np.eye(6)[y]
    probs[:, 5] += 0.3  # the last bin over-predicted
    probs /= probs.sum(1, keepdims=True)
    np.savez(tmp_path / "a.npz", direct_bin_probabilities=probs, true_bin=y)
    monkeypatch.setattr("sys.argv", ["x", str(tmp_path / "a.npz"), "--age", "--shuffles", "1"])
    vco.main()
    out = json.loads(capsys.readouterr().out)
    assert out["in_sample"]["offsets"][5] < 0  # pushed the over-predicted bin down
    assert out["in_sample"]["accuracy"] > out["plain"]["accuracy"]
