"""The training engine's parts, each tested without a run: class-balanced sampling, the
warm-up/cosine schedule, early stopping, settings (presets, overrides, heads), the bf16
choice, evaluation. Runs: tests/test_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_faceset

from faceattrs import config as cfgmod
from faceattrs import training as T
from faceattrs.devices import cpu_has_fast_bf16, use_bf16
from faceattrs.metrics import scores_from_confusion
from faceattrs.training.loop import evaluate_heads

# ------------------------------------------------------------------ sampling


def test_sampled_class_mix_is_close_to_uniform():
    rng = np.random.default_rng(0)
    shares = np.array([0.43, 0.19, 0.15, 0.16, 0.07])  # the data's imbalance
    labels = rng.choice(5, size=4000, p=shares)
    order = T.epoch_order(T.sampler_weights(labels), len(labels), seed=0, epoch=1)
    assert len(order) == len(labels)  # one epoch = the training-set size
    mix = np.bincount(labels[order.numpy()], minlength=5) / len(order)
    assert np.abs(mix - 0.2).max() < 0.03
    assert len(np.unique(order.numpy())) < len(labels)  # with replacement


def test_epoch_order_is_seeded_and_sharded():
    w = T.sampler_weights(np.arange(100) % 5)
    a = T.epoch_order(w, 100, seed=3, epoch=2)
    assert torch.equal(a, T.epoch_order(w, 100, seed=3, epoch=2))
    assert not torch.equal(a, T.epoch_order(w, 100, seed=3, epoch=3))
    shards = [T.epoch_order(w, 100, seed=3, epoch=2, rank=r, world=3) for r in range(3)]
    assert all(len(s) == 33 for s in shards)
    assert torch.equal(torch.cat(shards), a[:99])


# ------------------------------------------------------------------ control


def test_early_stopping_on_a_hand_written_sequence():
    es = T.EarlyStopping("val_score", mode="max", patience=3, min_delta=0.01)
    seq = [0.50, 0.60, 0.605, 0.59, 0.62, 0.61, 0.615, 0.60]
    improved = [es.step(v) for v in seq[:4]]
    assert improved == [True, True, False, False] and not es.should_stop
    improved += [es.step(v) for v in seq[4:]]
    # 0.605 is below best + min_delta; 0.62 improves; then three epochs without gain
    assert improved == [True, True, False, False, True, False, False, False]
    assert es.should_stop and es.best == 0.62 and es.best_epoch == 5
    restored = T.EarlyStopping("x")
    restored.load_state_dict(json.loads(json.dumps(es.state_dict())))
    assert restored.state_dict() == es.state_dict()

    low = T.EarlyStopping("val_loss", mode="min", patience=1)
    assert [low.step(v) for v in (3.0, 2.0, 2.5)] == [True, True, False] and low.should_stop


def test_warmup_then_cosine():
    f = [T.lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10], strict=False))  # rising warm-up
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # falling cosine
    assert f[55] == pytest.approx(0.5, abs=0.02) and f[-1] < 0.01


def test_config_presets_and_overrides():
    paper = T.resolve_config("paper")
    assert (paper.epochs, paper.lr, paper.weight_decay, paper.patience) == (50, 6e-4, 1e-3, 8)
    assert (paper.width, paper.warmup_epochs) == (1.0, 5.0)
    assert [(h.name, h.weight, h.smoothing, h.selects) for h in paper.heads] == [
        ("gender", 0.4, 0.0, True), ("ethnicity", 2.5, 0.12, True)
    ]  # fmt: skip
    cfg = T.resolve_config("cpu", ["lr=1e-3", "augment.rotation=5", "bf16=off"])
    assert cfg.width < 1 and cfg.lr == 1e-3 and cfg.augment.rotation == 5.0
    assert T.config_from_dict(cfgmod.to_dict(cfg)) == cfg
    with pytest.raises(cfgmod.ConfigError):
        T.resolve_config("cpu", ["lrr=1"])
    with pytest.raises(cfgmod.ConfigError):
        T.resolve_config("cpu", ["augment.rotaton=1"])
    assert paper.ema == 0.0  # the reference averages no weights
    assert paper.freeze == "" and paper.augment.enabled  # every weight trains, augmented
    with pytest.raises(cfgmod.ConfigError, match="ema"):
        T.resolve_config("cpu", ["ema=1"])


def test_heads_are_settings_and_older_runs_still_load():
    """The heads are TrainConfig.heads; the flat names of older versions set them, on the
    command line and in the saved settings of an older run (docs/results/paper-gpu)."""
    cfg = T.resolve_config(None, ["gender_weight=0.5", "ethnicity_smoothing=0",
                                  "heads.gender.smoothing=0.05"])  # fmt: skip
    gender, eth = cfg.heads
    assert (gender.weight, gender.smoothing, eth.weight, eth.smoothing) == (0.5, 0.05, 2.5, 0.0)
    extra = T.resolve_config("rgb", ["heads.smile.classes=no,yes", "heads.smile.selects=no"])
    assert [h.name for h in T.train_heads(extra)] == ["gender", "ethnicity", "smile", "age"]
    assert T.model_config(extra).heads == {"gender": 2, "ethnicity": 5, "smile": 2, "age": 117}
    assert T.config_from_dict(json.loads(json.dumps(cfgmod.to_dict(extra)))) == extra
    old = json.loads((Path(__file__).parents[1] / "docs/results/paper-gpu/config.json").read_text())
    old = old["config"]
    assert "gender_weight" in old and "heads" not in old  # written before the heads were data
    assert T.config_from_dict(old).heads == T.TrainConfig().heads
    old = {**old, "ethnicity_smoothing": 0.0}
    assert T.config_from_dict(old).heads[1].smoothing == 0.0
    for bad, says in (
        (["heads.smile.weight=1"], "class names"),
        (["heads.gender.smoothing=1"], "head 'gender'"),
        (["heads.gender.selects=no", "heads.ethnicity.selects=no"], "must select"),
        (["heads.age.classes=a,b"], "age_head=true"),
        (["heads.gender=1"], "heads.NAME.KEY"),
    ):
        with pytest.raises(cfgmod.ConfigError, match=says):
            T.resolve_config(None, bad)


def test_bf16_auto_follows_the_device():
    assert use_bf16("off", torch.device("cpu")) is False
    assert use_bf16("on", torch.device("cpu")) is True
    assert use_bf16("auto", torch.device("cpu")) is cpu_has_fast_bf16()
    assert use_bf16("auto", torch.device("mps")) is False


def test_scores_and_evaluation_without_augmentation():
    cm = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    s = scores_from_confusion(cm)
    assert s["accuracy"] == pytest.approx(5 / 6)
    assert s["macro_f1"] == pytest.approx(np.mean([2 * 3 / 7, 2 * 2 / 5]))  # absent class skipped
    torch.manual_seed(0)
    from faceattrs.model import FaceResNet, ModelConfig

    model = FaceResNet(ModelConfig(width=0.125))
    faces = synthetic_faceset(40)
    data = {"image": torch.from_numpy(faces.images),
            "gender": torch.from_numpy(faces.gender.astype(np.int64)),
            "ethnicity": torch.from_numpy(faces.ethnicity.astype(np.int64))}  # fmt: skip
    a = evaluate_heads(model, data, T.HEADS, batch_size=16)
    b = evaluate_heads(model, data, T.HEADS, batch_size=40)
    assert a == b and a["images"] == 40 and not model.training  # deterministic: no augmentation
    assert sum(map(sum, a["ethnicity"]["confusion"])) == 40


def test_evaluate_heads_age_mae_and_cs5_of_the_median_year():
    from faceattrs.postprocess import year_point

    class Fixed(torch.nn.Module):  # the same year distribution for every face: median 30
        def forward(self, x):
            p = torch.full((len(x), T.AGE_YEARS), 0.1 / (T.AGE_YEARS - 2))
            p[:, 30], p[:, 31] = 0.55, 0.35
            zeros = torch.zeros(len(x), 5)
            return {"gender": zeros[:, :2], "ethnicity": zeros, "age": p.log()}

    ages = torch.tensor([30, 36, 20, 31, 35])  # errors 0, 6, 10, 1, 5
    data = {"image": torch.zeros(5, 48, 48, dtype=torch.uint8),
            "gender": torch.zeros(5, dtype=torch.long),
            "ethnicity": torch.zeros(5, dtype=torch.long), "age": ages}  # fmt: skip
    ev = evaluate_heads(Fixed(), data, T.HEADS, batch_size=2, years="age")  # three batches
    assert ev["age"]["mae"] == pytest.approx(22 / 5) and ev["age"]["cs5"] == pytest.approx(3 / 5)
    logits = Fixed()(torch.zeros(1, 1, 48, 48))["age"].numpy()
    assert year_point(logits, "median")[0].tolist() == [30.0]  # the bundle's median agrees
    assert "age" not in evaluate_heads(Fixed(), data, T.HEADS)  # only when asked
