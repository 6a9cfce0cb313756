"""Age stage: bins, routing, per-bin regressors, the bundle, evaluation and a CLI smoke run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import synthetic_faceset

from faceattrs import postprocess
from faceattrs.age import bins as binsmod
from faceattrs.age import finetune, regress
from faceattrs.age.config import AgeConfig
from faceattrs.age.direct import dldl_loss, expected_age, mean_variance_loss
from faceattrs.age.evaluate import age_metrics, evaluate_age
from faceattrs.age.networks import AgeModel, save_age_model
from faceattrs.bundle import load_age_model, resolve_bundle
from faceattrs.checkpoint import CheckpointError, save_checkpoint
from faceattrs.exceptions import FaceattrsError
from faceattrs.model import FaceResNet, ModelConfig


# ---------------------------------------------------------------- bins
def test_quantile_bins_equal_sized_on_known_sequence():
    ages = np.arange(1, 601)
    edges = binsmod.quantile_edges(ages, 6)
    assert np.bincount(binsmod.assign_bins(ages, edges)).tolist() == [100] * 6
    # Ties: every age 5 times; edges must fall between distinct ages and stay equal-sized.
    tied = np.repeat(np.arange(1, 13), 5)
    e = binsmod.quantile_edges(np.random.default_rng(0).permutation(tied), 6)
    assert e.tolist() == [3, 5, 7, 9, 11]
    assert np.bincount(binsmod.assign_bins(tied, e)).tolist() == [10] * 6


def test_bins_half_open_last_open_ended_and_labels():
    edges = np.array(binsmod.REFERENCE_EDGES)
    assert binsmod.assign_bins(np.array([15, 16, 25, 26, 52, 53, 116]), edges).tolist() == [
        0,
        1,
        1,
        2,
        4,
        5,
        5,
    ]
    assert binsmod.bin_labels(edges) == ["0-16", "16-26", "26-29", "29-37", "37-53", "53+"]
    with pytest.raises(FaceattrsError):
        binsmod.check_edges([16, 16, 20])
    with pytest.raises(FaceattrsError):
        binsmod.quantile_edges(np.full(100, 30), 6)  # one distinct age cannot make 6 bins


# ---------------------------------------------------------------- routing
def _toy_model(per_bin_value: list[float], logits: list[list[float]]):
    """An AgeModel whose coarse head returns ``logits[i]`` for image i (images encode i in
    pixel (0, 0)) and whose regressor k always answers ``per_bin_value[k]``."""

    class Lookup(FaceResNet):
        def forward_head(self, z):
            idx = z[:, 0].round().long()
            return {"age_bin": torch.tensor(logits, dtype=torch.float32)[idx]}

        def embed(self, x):
            pix = ((x[:, 0, 0, 0] * 0.5 + 0.5) * 255).round()
            return torch.stack([pix, torch.zeros_like(pix)], 1)

    coarse = Lookup(ModelConfig(width=0.125, heads={"age_bin": len(per_bin_value)}))
    reg = regress.BinRegressors(2, len(per_bin_value), hidden=4, dropout=0.0)
    for k, v in enumerate(per_bin_value):
        torch.nn.init.zeros_(reg.mlps[k][-1].weight)
        torch.nn.init.zeros_(reg.mlps[k][-1].bias)
        reg.center[k] = v
    images = np.zeros((len(logits), 48, 48), np.uint8)
    images[:, 0, 0] = np.arange(len(logits))
    return AgeModel(coarse, reg.eval(), np.array([20.0, 40.0]), clip=(1, 100)), images


def test_routing_hard_and_soft_on_hand_built_toy():
    log = np.log
    logits = [[log(0.7), log(0.2), log(0.1)], [log(0.1), log(0.3), log(0.6)]]
    model, images = _toy_model([10.0, 30.0, 60.0], logits)
    hard = model.predict(images, routing="hard")
    soft = model.predict(images, routing="soft")
    assert hard["value"].tolist() == pytest.approx([10.0, 60.0])
    assert soft["value"].tolist() == pytest.approx(
        [0.7 * 10 + 0.2 * 30 + 0.1 * 60, 0.1 * 10 + 0.3 * 30 + 0.6 * 60]
    )
    assert hard["bin"].tolist() == [0, 2]
    assert hard["bin_probabilities"] == pytest.approx(np.exp(np.array(logits)))
    assert model.bin_labels == ["0-20", "20-40", "40+"]


def test_oracle_mae_not_worse_than_hard_on_toy():
    # Embeddings carry the age; the coarse bin is wrong for 40 % of the faces.
    rng = np.random.default_rng(0)
    edges = np.array([20.0, 40.0])

    def make(n):
        age = rng.integers(1, 70, n).astype(np.float64)
        z = np.column_stack([age / 70, rng.normal(size=(n, 7))]).astype(np.float32)
        return z, age

    (zt, at), (zv, av), (ze, ae) = make(450), make(150), make(300)
    cfg = AgeConfig(reg_epochs=40, reg_patience=10, reg_lr=1e-2, reg_batch_size=64)
    reg, _ = finetune.train_regressors(zt, at, zv, av, edges, cfg)
    with torch.no_grad():
        per_bin = reg(torch.as_tensor(ze)).double().numpy()
    true_bin = binsmod.assign_bins(ae, edges)
    noisy = np.where(rng.random(len(ae)) < 0.4, (true_bin + 1) % 3, true_bin)
    probs = np.full((len(ae), 3), 0.1)
    probs[np.arange(len(ae)), noisy] = 0.8
    pred = {
        "per_bin": per_bin,
        "bin_probabilities": probs,
        "hard": postprocess.route(probs, per_bin, "hard"),
        "soft": postprocess.route(probs, per_bin, "soft"),
    }
    m = age_metrics(
        pred,
        ae,
        np.zeros(len(ae), int),
        np.zeros(len(ae), int),
        edges,
        binsmod.bin_labels(edges),
        "hard",
        "two_stage",
        (1, 100),
    )
    assert m["bin_accuracy"] == pytest.approx((noisy == true_bin).mean(), abs=1e-4)
    assert m["mae_oracle_bins"] < 4.0  # the regressors learnt their bins
    assert m["mae_oracle_bins"] <= m["mae_hard"]
    assert m["mae_hard"] > 2 * m["mae_oracle_bins"]  # wrong bins cost years


def test_per_bin_regressor_never_sees_other_bins(monkeypatch):
    rng = np.random.default_rng(1)
    age = rng.integers(1, 90, 200)
    edges = binsmod.quantile_edges(age, 6)
    seen = {}
    real = finetune._fit_one

    def spy(reg, k, x, y, xv, yv, cfg):
        seen[k] = (x.copy(), y.copy(), yv.copy())
        return real(reg, k, x, y, xv, yv, cfg)

    monkeypatch.setattr(finetune, "_fit_one", spy)
    z = np.column_stack([age, rng.normal(size=(200, 3))]).astype(np.float32)  # col 0 = age
    finetune.train_regressors(
        z[:150], age[:150], z[150:], age[150:], edges, AgeConfig(reg_epochs=2)
    )
    lo, hi = [0, *edges], [*edges, np.inf]
    assert sorted(seen) == list(range(6))
    for k, (x, y, yv) in seen.items():
        assert np.all((y >= lo[k]) & (y < hi[k])), f"bin {k} got other bins' training ages"
        assert np.all((yv >= lo[k]) & (yv < hi[k])), f"bin {k} got other bins' val ages"
        assert np.array_equal(x[:, 0], y)  # embeddings travel with their own ages
    assert sum(len(v[1]) for v in seen.values()) == 150


# ---------------------------------------------------------------- direct head losses
@pytest.mark.parametrize("kind", ["dldl", "mean_variance"])
def test_direct_losses_pull_expected_age_to_target(kind):
    torch.manual_seed(0)
    logits = torch.zeros(4, 101, requires_grad=True)
    age = torch.tensor([5.0, 25.0, 50.0, 80.0])
    opt = torch.optim.Adam([logits], lr=0.3)
    for _ in range(100):
        loss = (
            dldl_loss(logits, age, 2.0, 1.0)
            if kind == "dldl"
            else mean_variance_loss(logits, age, 0.2, 0.05)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (expected_age(logits) - age).abs().max() < 1.5


# ---------------------------------------------------------------- bundle
def _tiny_multitask(run_dir):
    torch.manual_seed(0)
    save_checkpoint(
        run_dir, "best", FaceResNet(ModelConfig(width=0.125)), {"epoch": 0, "score": 0.0}
    )
    return run_dir


def _tiny_age_model(direct: bool = True) -> AgeModel:
    torch.manual_seed(1)
    coarse = FaceResNet(ModelConfig(width=0.125, heads={"age_bin": 6})).eval()
    reg = regress.BinRegressors(coarse.embed_dim, 6, hidden=8)
    reg.center.copy_(torch.tensor([8.0, 20, 27, 33, 45, 70]))
    reg.scale.fill_(5.0)
    reg.low.copy_(torch.tensor([1.0, 16, 26, 29, 37, 53]))
    reg.high.copy_(torch.tensor([15.0, 25, 28, 36, 52, 100]))
    d = FaceResNet(ModelConfig(width=0.125, heads={"age": 101})).eval() if direct else None
    return AgeModel(
        coarse,
        reg.eval(),
        np.array([16.0, 26, 29, 37, 53]),
        routing="hard",
        approach="two_stage",
        direct=d,
        clip=(1.0, 100.0),
    )


def test_bundle_roundtrip_and_resolve(tmp_path):
    mt = _tiny_multitask(tmp_path / "run")
    model = _tiny_age_model()
    save_age_model(tmp_path / "run" / "age", model, mt, {"selection": {}})
    images = synthetic_faceset(12).images
    loaded = load_age_model(tmp_path / "run" / "age")
    for approach in ("two_stage", "direct"):
        a, b = model.predict(images, approach), loaded.predict(images, approach)
        np.testing.assert_allclose(a["value"], b["value"], rtol=1e-5)
        assert a["value"].min() >= 1 and a["value"].max() <= 100
        assert b["bin_probabilities"].shape == (12, 6)
        np.testing.assert_allclose(b["bin_probabilities"].sum(1), 1, rtol=1e-6)
    assert loaded.bin_labels == ["0-16", "16-26", "26-29", "29-37", "37-53", "53+"]
    assert loaded.routing == "hard" and loaded.approach == "two_stage"
    # hard routing stays inside the predicted bin's training range
    p = loaded.predict(images)
    lo, hi = model.regressors.low.numpy(), model.regressors.high.numpy()
    assert np.all((p["value"] >= lo[p["bin"]]) & (p["value"] <= hi[p["bin"]]))
    # Either folder names the same bundle.
    run, age = (tmp_path / "run").resolve(), tmp_path / "run" / "age"
    assert resolve_bundle(age) == (run, age)
    assert resolve_bundle(tmp_path / "run") == (tmp_path / "run", age)
    assert load_age_model(tmp_path / "run") is not None


def test_resolve_bundle_without_age_and_errors(tmp_path):
    mt = _tiny_multitask(tmp_path / "mt")
    assert resolve_bundle(mt) == (mt, None)
    assert load_age_model(mt) is None
    with pytest.raises(CheckpointError, match="not a model folder"):
        resolve_bundle(tmp_path)
    # An age run elsewhere refers to its multitask run by a relative path; a moved-away
    # one says so clearly.
    save_age_model(tmp_path / "elsewhere" / "age", _tiny_age_model(direct=False), mt, {})
    assert resolve_bundle(tmp_path / "elsewhere" / "age")[0] == mt.resolve()
    meta = json.loads((tmp_path / "elsewhere" / "age" / "age.json").read_text())
    meta.update(multitask="../nowhere", multitask_absolute=str(tmp_path / "nowhere"))
    (tmp_path / "elsewhere" / "age" / "age.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="multitask model is missing"):
        resolve_bundle(tmp_path / "elsewhere" / "age")


def test_evaluate_age_writes_metrics_and_figures(tmp_path):
    faces = synthetic_faceset(80)
    m = evaluate_age(_tiny_age_model(), faces, "all", out_dir=tmp_path)
    for key in (
        "mae",
        "mae_hard",
        "mae_soft",
        "mae_oracle_bins",
        "median_ae",
        "cs5",
        "bin_accuracy",
        "bin_macro_f1",
        "mae_per_bin",
        "mae_per_ethnicity",
        "mae_per_gender",
        "direct",
    ):
        assert key in m, key
    assert m["n"] == 80 and m["mae"] == m["mae_hard"]  # the toy's default routing is hard
    # every figure recomputed from the model's own predictions on the same faces
    model, age = _tiny_age_model(), faces.age.astype(float)
    hard, soft = (model.predict(faces.images, routing=r) for r in ("hard", "soft"))
    direct = model.predict(faces.images, "direct")
    true_bin = binsmod.assign_bins(age, model.edges)
    assert m["mae"] == pytest.approx(np.abs(hard["value"] - age).mean(), abs=1e-4)
    assert m["mae_soft"] == pytest.approx(np.abs(soft["value"] - age).mean(), abs=1e-4)
    assert m["direct"]["mae"] == pytest.approx(np.abs(direct["value"] - age).mean(), abs=1e-4)
    assert m["default_mae"] == m["mae"]  # the toy's default approach is two-stage
    assert m["median_ae"] == pytest.approx(np.median(np.abs(hard["value"] - age)), abs=1e-4)
    assert m["cs5"] == pytest.approx((np.abs(hard["value"] - age) <= 5).mean(), abs=1e-4)
    assert m["bin_accuracy"] == pytest.approx((hard["bin"] == true_bin).mean(), abs=1e-4)
    assert m["direct"]["bin_accuracy"] == pytest.approx(
        (direct["bin"] == true_bin).mean(), abs=1e-4
    )
    for k, label in enumerate(model.bin_labels):
        row, inside = m["mae_per_bin"][label], true_bin == k
        assert row["n"] == inside.sum(), label
        if inside.any():
            want = np.abs(soft["value"][inside] - age[inside]).mean()
            assert row["soft"] == pytest.approx(want, abs=1e-4), label
    for key in ("mae", "default_mae", "cs5", "bin_accuracy"):  # 95 % bootstrap intervals
        low, high = m["ci95"][key]
        assert low <= m[key] <= high and low < high, key
    assert sum(b["n"] for b in m["mae_per_bin"].values()) == 80
    assert set(m["mae_per_ethnicity"]["groups"]) == {"White", "Black", "Asian", "Indian", "Other"}
    for name in (
        "age_scatter",
        "age_mae_by_bin",
        "age_mae_by_group",
        "age_bin_confusion",
        "age_grid",
    ):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "age_metrics.json").read_text())
    assert saved["mae_oracle_bins"] == m["mae_oracle_bins"]


# ---------------------------------------------------------------- the whole stage
def _prepared(tmp_path, n=120):
    """A prepared folder (faces.npz) holding a synthetic split face set."""
    faces = synthetic_faceset(n)
    folder = tmp_path / "prepared"
    folder.mkdir()
    np.savez(folder / "faces.npz", **faces.to_arrays())
    return folder, faces


def test_train_age_cli_one_epoch_smoke(tmp_path):
    from faceattrs.cli import main

    mt = _tiny_multitask(tmp_path / "mt")
    data, faces = _prepared(tmp_path)
    out = tmp_path / "age"
    argv = [
        "train-age",
        "--model",
        str(mt),
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "cpu",
        "--device",
        "cpu",
        "--set",
        "batch_size=32",
        "--set",
        "max_batches=2",
        "--set",
        "finetune_epochs=1",
        "--set",
        "reg_epochs=3",
        "--set",
        "eval_batch_size=64",
    ]
    assert main(argv) == 0
    for name in (
        "age.json",
        "config.json",
        "coarse.json",
        "coarse.safetensors",
        "regressors.safetensors",
        "direct.json",
        "direct.safetensors",
        "metrics.json",
        "summary.json",
        "regressors.json",
        "figures/age_grid.png",
        "figures/age_scatter.png",
        "figures/age_predictions_test.npz",
    ):
        assert (out / name).exists(), name
    history = list(csv.DictReader((out / "coarse_history.csv").open()))
    assert [(r["stage"], r["epoch"]) for r in history] == [("1", "1"), ("2", "1")]
    meta = json.loads((out / "age.json").read_text())
    sel = meta["selection"]
    assert meta["routing"] == min(("hard", "soft"), key=lambda r: sel[f"val_mae_{r}"])
    direct_better = sel["val_mae_direct"] < sel[f"val_mae_{meta['routing']}"]
    assert meta["approach"] == ("direct" if direct_better else "two_stage")
    # bins from the training split's quantiles
    train_age = faces.age[faces.split == 0]
    assert meta["edges"] == binsmod.quantile_edges(train_age, 6).tolist()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["age"]["n"] == int((faces.split == 2).sum())
    assert metrics["val"]["age"]["n"] == int((faces.split == 1).sum())
    # the test figures are those of the saved model's predictions on the test faces
    model = load_age_model(out)
    test, val = faces.subset("test"), faces.subset("val")
    default = model.predict(test.images)
    err = {
        "default": np.abs(default["value"] - test.age),
        "soft": np.abs(model.predict(test.images, "two_stage", "soft")["value"] - test.age),
        "direct": np.abs(model.predict(test.images, "direct")["value"] - test.age),
    }
    assert metrics["age"]["default_mae"] == pytest.approx(err["default"].mean(), abs=1e-3)
    assert metrics["age"]["mae_soft"] == pytest.approx(err["soft"].mean(), abs=1e-3)
    assert metrics["age"]["direct"]["mae"] == pytest.approx(err["direct"].mean(), abs=1e-3)
    # The age run is a model bundle: it finds its multitask model and predicts.
    assert resolve_bundle(out)[0] == mt.resolve()
    p = model.predict(faces.images[:5])
    assert p["value"].shape == (5,) and p["bin_probabilities"].shape == (5, 6)
    # 90 % split-conformal intervals fitted on validation, stored in age.json, used by predict
    assert meta["interval"]["fitted_on"] == "val" and len(meta["interval"]["per_bin"]) == 6
    low, high = p["interval"]
    assert np.all(low <= p["value"]) and np.all(p["value"] <= high)
    assert metrics["val"]["age"]["interval"]["coverage"] >= 0.9  # by construction on val
    # the half-widths are the split-conformal fit to the model's validation predictions
    from faceattrs.age import conformal

    on_val = model.predict(val.images)
    refit = conformal.fit(val.age, on_val["value"], on_val["bin"], model.n_bins)
    assert refit["per_bin"] == pytest.approx(meta["interval"]["per_bin"], abs=1e-3)
    assert refit["val_counts"] == meta["interval"]["val_counts"]
    # and the test coverage is the share of test ages inside the intervals predict gives
    low, high = default["interval"]
    inside = (test.age >= low) & (test.age <= high)
    assert metrics["age"]["interval"]["coverage"] == pytest.approx(inside.mean(), abs=1e-4)
    assert metrics["age"]["interval"]["n"] == len(test)
    # ... and `evaluate --model AGE_RUN` evaluates both models, age included.
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(out), "--data", str(data), "--out", str(ev)]) == 0
    evaluated = json.loads((ev / "metrics.json").read_text())
    assert evaluated["age"]["mae"] == metrics["age"]["mae"]
    assert evaluated["gender"]["n"] == metrics["age"]["n"]
    # A second run into the same folder is refused (exit 2) unless --overwrite.
    assert main(argv) == 2


def test_train_age_explicit_bins_no_direct_and_backbone_copy(tmp_path):
    from faceattrs.age import train_age
    from faceattrs.checkpoint import load_model

    mt = _tiny_multitask(tmp_path / "mt")
    faces = synthetic_faceset(120)
    cfg = AgeConfig(
        edges=(16, 26, 29, 37, 53),
        direct=False,
        head_epochs=1,
        finetune_epochs=0,
        batch_size=32,
        max_batches=2,
        reg_epochs=2,
        eval_batch_size=64,
    )
    summary = train_age(mt, faces, tmp_path / "age", cfg, device="cpu")
    assert summary["bin_labels"] == ["0-16", "16-26", "26-29", "29-37", "37-53", "53+"]
    assert summary["test"]["direct_mae"] is None and summary["test"]["approach"] == "two_stage"
    # Stage 1 only: the backbone is exactly the multitask one (frozen, BN statistics too).
    mt_state = load_model(mt)[0].state_dict()
    coarse_state = load_model(tmp_path / "age", "coarse")[0].state_dict()
    for k, v in mt_state.items():
        if k.startswith(("stem.", "stages.")):
            assert torch.equal(v, coarse_state[k]), k


def test_conformal_interval_covers_new_data_at_the_nominal_rate():
    from faceattrs.age import conformal

    rng = np.random.default_rng(0)

    def sample(n):
        b = rng.integers(0, 3, n)
        y = rng.uniform(1, 90, n)
        return y, y + rng.normal(0, 1 + 4 * b), b  # bin 2 is four times noisier than bin 0

    widths = conformal.fit(*sample(3000), n_bins=3)
    assert widths["per_bin"][0] < widths["per_bin"][1] < widths["per_bin"][2]
    y, pred, b = sample(20000)
    low, high = postprocess.conformal_interval(pred, b, widths)
    for k in range(3):
        cov = conformal.coverage(y[b == k], low[b == k], high[b == k])["coverage"]
        assert 0.88 <= cov <= 0.92, (k, cov)
    # a bin with too few validation faces falls back to the global half-width
    y, pred, b = sample(300)
    b[b == 2] = 1
    b[:5] = 2
    small = conformal.fit(y, pred, b, n_bins=3, min_count=30)
    assert small["per_bin"][2] == small["global"] and small["val_counts"][2] == 5
    # too few faces for the quantile: an infinite (honest) interval, not a made-up one
    assert conformal.conformal_quantile(np.ones(5), 0.1) == np.inf
