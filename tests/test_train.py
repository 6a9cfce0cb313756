"""Training engine: sampling, schedule, early stopping, config, CLI run, resume, DDP."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import synthetic_faceset
from safetensors.torch import load_file

from faceattrs import config as cfgmod
from faceattrs import training as T
from faceattrs.checkpoint import load_model
from faceattrs.devices import cpu_has_fast_bf16, use_bf16
from faceattrs.exceptions import FaceattrsError
from faceattrs.metrics import scores_from_confusion
from faceattrs.model import FaceResNet
from faceattrs.prepare import data_key
from faceattrs.training import losses, state
from faceattrs.training import run as run_module
from faceattrs.training.loop import evaluate_heads
from faceattrs.training.run import split_tensors

# one thread: tiny tensors gain nothing from two, and two OpenMP threads crawl when other
# processes share the cores
TINY = {"width": 0.125, "batch_size": 16, "epochs": 3, "warmup_epochs": 1.0, "device": "cpu",
        "eval_batch_size": 64, "threads": 1}  # fmt: skip


def tiny_cfg(**kw) -> T.TrainConfig:
    return T.resolve_config("paper", {**TINY, **kw})


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


# ------------------------------------------------------------------ runs


def _history(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_fit_writes_the_run_folder(tmp_path):
    faces = synthetic_faceset(80)
    summary = T.fit(faces, tmp_path / "run", tiny_cfg(epochs=2), data_ref="synthetic")
    run = tmp_path / "run"
    for name in (
        "config.json",
        "best.json",
        "best.safetensors",
        "last.json",
        "last.safetensors",
        "last_state.safetensors",
        "history.csv",
        "history.png",
    ):
        assert (run / name).exists(), name  # fmt: skip
    rows = _history(run / "history.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(T.HISTORY_FIELDS) <= set(rows[0])
    best = json.loads((run / "best.json").read_text())
    assert best["epoch"] == summary["best_epoch"]
    assert best["score"] == pytest.approx(max(float(r["val_score"]) for r in rows))
    assert best["config"]["width"] == 0.125 and best["class_names"]["ethnicity"][0] == "White"
    model, meta = load_model(run, "best")
    assert meta["normalisation"] == {"mean": 0.5, "std": 0.5} and model.embed_dim == 64
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == "synthetic" and config["config"]["epochs"] == 2
    with pytest.raises(T.TrainError, match="--resume"):  # never overwrite a run
        T.fit(faces, run, tiny_cfg(epochs=2))


def test_blocks_set_the_depth_and_the_checkpoint_keeps_it(tmp_path):
    """blocks=1,1,1,1 trains a ResNet-10 (one residual block per stage, the reference's
    ResNet-18 has two); the checkpoint records it, so loading builds the same network."""
    from faceattrs.model import BasicBlock, FaceResNet

    cfg = tiny_cfg(epochs=1, blocks="1,1,1,1")
    assert cfg.blocks == (1, 1, 1, 1) and T.config_from_dict(cfgmod.to_dict(cfg)) == cfg
    T.fit(synthetic_faceset(40), tmp_path / "run", cfg)
    model, _ = load_model(tmp_path / "run", "best")
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 4
    assert tuple(model.cfg.blocks) == (1, 1, 1, 1)
    resnet18 = FaceResNet(T.model_config(tiny_cfg()))  # the default: two blocks per stage
    assert sum(isinstance(m, BasicBlock) for m in resnet18.modules()) == 8
    for bad in ("1,1,1", "2,0,2,2"):
        with pytest.raises(cfgmod.ConfigError, match="four counts of at least 1"):
            tiny_cfg(blocks=bad)


@pytest.mark.parametrize(
    "ema,age_head,frozen",
    [(0.0, False, False), (0.9, False, False), (0.0, True, False), (0.9, True, True)],
    ids=["plain", "ema", "age_head", "frozen"],
)
def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch, ema, age_head, frozen):
    faces = synthetic_faceset(80)
    frozen_kw = {"freeze": "backbone", "augment.enabled": False} if frozen else {}
    cfg = tiny_cfg(epochs=3, patience=10, ema=ema, age_head=age_head, **frozen_kw)
    T.fit(faces, tmp_path / "full", cfg)

    saves = []
    real_save = state.save_checkpoint

    def crash_after_epoch_2(run_dir, name, model, meta):  # dies right after saving "last"
        real_save(run_dir, name, model, meta)
        saves.append(name)
        if saves.count("last") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(state, "save_checkpoint", crash_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        T.fit(faces, tmp_path / "cut", cfg)
    assert json.loads((tmp_path / "cut" / "last.json").read_text())["epoch"] == 2
    monkeypatch.undo()
    summary = T.fit(faces, tmp_path / "cut", cfg, resume=True)
    assert summary["epochs_run"] == 3

    for name in ("last", "best"):
        a = load_file(str(tmp_path / "full" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "cut" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    timing = {"seconds", "images_per_s"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in
             _history(tmp_path / "full" / "history.csv")]  # fmt: skip
    assert strip == [{k: v for k, v in r.items() if k not in timing}
                     for r in _history(tmp_path / "cut" / "history.csv")]  # fmt: skip
    if frozen:  # its optimiser holds the heads alone: resuming it unfrozen is one line
        with pytest.raises(T.TrainError, match="keep its freeze setting"):
            T.fit(faces, tmp_path / "cut", tiny_cfg(epochs=4, patience=10, ema=ema,
                  age_head=age_head, **{"augment.enabled": False}), resume=True)  # fmt: skip


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


def test_age_head_run_is_a_bundle_with_its_age_model(tmp_path):
    from faceattrs.age.bins import quantile_edges
    from faceattrs.backends import TorchBackend
    from faceattrs.calibrate import calibrate_run

    faces = synthetic_faceset(80)
    run = tmp_path / "run"
    T.fit(faces, run, tiny_cfg(epochs=2, age_head=True), data_ref="synthetic")
    best = json.loads((run / "best.json").read_text())
    rows = _history(run / "history.csv")  # the age head's validation figures, per epoch
    assert len(rows) == 2 and all(0 <= float(r["val_age_mae"]) <= T.AGE_YEARS for r in rows)
    assert all(0 <= float(r["val_age_cs5"]) <= 1 and float(r["train_loss_age"]) > 0 for r in rows)
    assert best["model"]["heads"] == {"gender": 2, "ethnicity": 5, "age": T.AGE_YEARS}
    train_ages = faces.age[faces.indices("train")]
    assert best["age_edges"] == [float(e) for e in quantile_edges(train_ages, 6)]
    # the age term is in the loss: the age head's weights moved from their initial values
    model, _ = load_model(run, "best")
    torch.manual_seed(tiny_cfg().seed)
    init = FaceResNet(T.model_config(tiny_cfg(age_head=True)))
    assert not torch.equal(model.heads["age"].fc.weight, init.heads["age"].fc.weight)
    calibrate_run(run, faces)
    age = json.loads((run / "age" / "age.json").read_text())
    assert age["direct"] == "multitask" and age["edges"] == best["age_edges"]
    logits, pred = TorchBackend(run).outputs(faces.images[:3])
    assert set(logits) == {"gender", "ethnicity"} and pred["value"].shape == (3,)
    # the loss: the two heads' loss plus weight x (smoothed CE + l1 x |E[age] - age|)
    cfg = tiny_cfg(age_head=True, age_weight=2.0, age_l1=0.5, age_smoothing=0.0)
    out = {"gender": torch.zeros(2, 2), "ethnicity": torch.zeros(2, 5),
           "age": torch.full((2, T.AGE_YEARS), -30.0)}  # fmt: skip
    out["age"][:, 30] = 0.0  # all mass on 30 years
    batch = {"gender": torch.tensor([0, 1]), "ethnicity": torch.tensor([0, 1]),
             "age": torch.tensor([30, 40])}  # fmt: skip
    loss, parts = T.with_age_head(T.multitask_loss(cfg), cfg)(out, batch)
    ce = torch.nn.functional.cross_entropy(out["age"], batch["age"])
    assert parts["age"].item() == pytest.approx(ce.item() + 0.5 * 5.0, rel=1e-4)  # L1 = (0+10)/2
    base = T.multitask_loss(cfg)(out, batch)[0]
    assert loss.item() == pytest.approx(base.item() + 2.0 * parts["age"].item(), rel=1e-5)


def test_ema_run_evaluates_and_saves_the_average(tmp_path):
    faces = synthetic_faceset(80)
    cfg = tiny_cfg(epochs=2, patience=10, ema=0.9)
    T.fit(faces, tmp_path / "run", cfg)
    run = tmp_path / "run"
    state = T.read_train_state(run)
    last = load_file(str(run / "last.safetensors"))
    assert state["ema"]["n_averaged"].item() > 1
    # the checkpoint is the average, not the raw weights the optimiser holds
    assert all(torch.equal(v, state["ema"][f"module.{k}"]) for k, v in last.items())
    assert not torch.equal(last["stem.0.weight"], state["model"]["stem.0.weight"])
    # and the history's validation score is that of the saved model
    model, _ = load_model(run, "last")
    val = split_tensors(faces, "val", 0, cfg.seed + 1, "cpu")
    bf16 = json.loads((run / "config.json").read_text())["bf16"]
    ev = evaluate_heads(model, val, T.HEADS, batch_size=64, bf16=bf16, channels_last=True)
    score = sum(ev[h]["macro_f1"] for h in T.HEADS) / len(T.HEADS)
    assert score == pytest.approx(float(_history(run / "history.csv")[-1]["val_score"]), abs=1e-6)
    with pytest.raises(T.TrainError, match="keep its ema setting"):
        T.fit(faces, run, tiny_cfg(epochs=3, patience=10, ema=0.0), resume=True)


# ------------------------------------------------------------------ freeze=backbone

FROZEN = {"freeze": "backbone", "augment.enabled": False, "epochs": 2, "patience": 10}


def _initial_weights(cfg: T.TrainConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.seed)  # as fit builds the network
    return FaceResNet(T.model_config(cfg)).state_dict()


@pytest.mark.parametrize("augment", [False, True], ids=["cached", "augmented"])
def test_frozen_backbone_keeps_its_weights_and_the_heads_train(tmp_path, caplog, augment):
    """freeze=backbone: after fit the backbone (weights and BatchNorm statistics) is the
    initial one bit for bit, every head's weight moved, the optimiser holds the heads
    alone; without augmentation the backbone's features are computed once, with it every
    step runs the whole network (the log says which, once)."""
    cfg = tiny_cfg(**{**FROZEN, "augment.enabled": augment})
    with caplog.at_level(logging.INFO, logger="faceattrs.training.run"):
        T.fit(synthetic_faceset(80), tmp_path / "run", cfg)
    init = _initial_weights(cfg)
    last = load_file(str(tmp_path / "run" / "last.safetensors"))
    heads = [k for k in last if k.startswith("heads.")]
    backbone = [k for k in last if not k.startswith("heads.")]
    assert heads and any("running_var" in k for k in backbone)
    assert all(torch.equal(last[k], init[k]) for k in backbone)
    assert all(not torch.equal(last[k], init[k]) for k in heads)
    groups = T.read_train_state(tmp_path / "run")["resume"]["optimizer_param_groups"]
    assert sum(len(g["params"]) for g in groups) == len(heads)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("freeze=")]
    assert len(said) == 1 and ("computed once" in said[0]) is not augment, said


def test_cached_features_train_the_heads_the_whole_forward_trains(tmp_path, monkeypatch):
    """Without augmentation, the heads trained on features computed once equal (to float
    rounding) those trained by the whole network's forward at every step: the same
    sampling order, the same dropout draws (the frozen backbone draws none), the same
    inputs (the training faces normalised by the augmenter, validation's by the network);
    the EMA and the age head included."""
    faces = synthetic_faceset(80)
    cfg = tiny_cfg(**FROZEN, ema=0.9, age_head=True, lr=1e-2)
    T.fit(faces, tmp_path / "fast", cfg)
    calls = []
    monkeypatch.setattr(run_module, "_frozen_path", calls.append)  # no features cached
    T.fit(faces, tmp_path / "slow", cfg)
    assert len(calls) == 1  # the second run took the whole-forward path
    init = _initial_weights(cfg)
    for name in ("last", "best"):
        fast, slow = (
            load_file(str(tmp_path / r / f"{name}.safetensors")) for r in ("fast", "slow")
        )
        assert fast.keys() == slow.keys()
        for k in fast:
            assert torch.allclose(fast[k], slow[k], rtol=0, atol=1e-6), (name, k)
    moved = max((fast[k] - init[k]).abs().max().item() for k in fast if k.startswith("heads."))
    assert moved > 1e-3  # far above the tolerance
    rows = [_history(tmp_path / r / "history.csv") for r in ("fast", "slow")]
    for a, b in zip(*rows, strict=True):
        for col in ("train_loss", "val_loss", "val_score", "val_age_mae"):
            assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-5), col


def test_bad_freeze_value_is_one_line(tmp_path, capsys):
    from faceattrs.cli import main

    with pytest.raises(cfgmod.ConfigError, match="'freeze' must be backbone"):
        tiny_cfg(freeze="heads")
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "freeze=heads"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'freeze' must be backbone" in err, err
    assert not (tmp_path / "run").exists()


def test_cli_one_epoch_on_real_data(tmp_path, shared_csv, monkeypatch, capsys):
    from faceattrs.cli import main

    small = tmp_path / "small.csv"
    with gzip.open(shared_csv, "rt") as f, small.open("w") as out:
        for i, line in enumerate(f):
            if i > 400:
                break
            out.write(line)
    monkeypatch.setenv("FACEATTRS_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    argv = ["train", "--data", str(small), "--out", str(run), "--preset", "cpu", "--no-progress",
            "epochs=1", "batch_size=32", "max_batches=3", "device=cpu"]  # fmt: skip
    assert main(argv) == 0
    for name in ("config.json", "best.json", "last.json", "history.csv", "history.png"):
        assert (run / name).exists(), name
    assert len(_history(run / "history.csv")) == 1
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["width"] == T.PRESETS["cpu"]["width"]
    assert config["data"] == str(small.resolve())
    cached = next((tmp_path / "cache").rglob("small.csv-*"))  # prepared copy: the same key
    assert config["data_key"] == data_key(small) == data_key(cached) == cached.name[-20:]
    # extend the finished run by one epoch through --resume
    assert main(["train", "--resume", str(run), "--no-progress", "epochs=2"]) == 0
    assert [r["epoch"] for r in _history(run / "history.csv")] == ["1", "2"]
    assert main(["train", "--data", str(small), "--out", str(run), "bogus=1"]) == 2
    # a run that starts from this one's weights (init=); a missing one: one line, exit 2
    warm = argv[:4] + [str(tmp_path / "warm")] + argv[5:] + [f"init={run}"]
    assert main(warm) == 0
    assert json.loads((tmp_path / "warm" / "config.json").read_text())["init"]["source"] == str(run)
    capsys.readouterr()
    assert main(argv[:4] + [str(tmp_path / "cold")] + argv[5:] + [f"init={tmp_path}/no"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err, err


# ------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    from faceattrs import training as TT
    from faceattrs.training.loop import evaluate_heads as ev
    from faceattrs.training.run import split_tensors as split

    faces = synthetic_faceset(80)
    cfg = TT.resolve_config("paper", {**TINY, "epochs": 1, "batch_size": 8})
    summary = TT.fit(faces, Path(tmp) / "run", cfg, progress=False)
    # metrics across ranks: each rank scores its shard, the result is the whole set's
    best, _ = load_model(Path(tmp) / "run", "best")
    val = split(faces, "val", 0, 0, torch.device("cpu"))
    shard = torch.arange(rank, len(val["image"]), world)
    result = ev(best, val, TT.HEADS, indices=shard)
    out = {"summary": summary, "eval": result}
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["summary"]["world_size"] == 2
    assert r0["summary"]["best_score"] == r1["summary"]["best_score"]  # same metrics on ranks
    assert r0["eval"] == r1["eval"]
    # the sharded, all-reduced evaluation equals one process scoring the whole split
    best, _ = load_model(tmp_path / "run", "best")
    faces = synthetic_faceset(80)
    val = split_tensors(faces, "val", 0, 0, torch.device("cpu"))
    whole = evaluate_heads(best, val, T.HEADS)
    assert r0["eval"]["ethnicity"]["confusion"] == whole["ethnicity"]["confusion"]
    assert r0["eval"]["gender"]["macro_f1"] == pytest.approx(whole["gender"]["macro_f1"])
    rows = _history(tmp_path / "run" / "history.csv")
    assert len(rows) == 1 and math.isfinite(float(rows[-1]["train_loss"]))
    # each rank trained on half the epoch: 64 train faces / 2 ranks / batch 8 = 4 steps
    assert json.loads((tmp_path / "run" / "last.json").read_text())["resume"]["scheduler"][
        "last_epoch"] == 4  # fmt: skip


def test_torchrun_two_processes_one_log_one_set_of_files(tmp_path):
    """``torchrun --nproc_per_node=2 -m faceattrs train`` on CPU (gloo): one log (rank 0's),
    one set of files (those of a one-process run), the same weights on both ranks."""
    import subprocess
    import sys

    from conftest import tiny_csv

    from faceattrs.cli import main

    prepared = tmp_path / "prepared"
    assert main(["prepare", "--data", str(tiny_csv(tmp_path)), "--out", str(prepared)]) == 0
    settings = [f"{k}={v}" for k, v in {**TINY, "epochs": 1, "batch_size": 8}.items()]
    one = tmp_path / "one"
    assert main(["train", "--data", str(prepared), "--out", str(one), *settings]) == 0
    run, dump = tmp_path / "two", tmp_path / "dump"
    dump.mkdir()
    script = Path(__file__).with_name("torchrun_train.py")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), str(dump), "train", "--data", str(prepared), "--out", str(run),
         *settings],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    for line in ("training ", "epoch 1/1 ", "best epoch 1"):
        assert sum(row.startswith(line) for row in log.splitlines()) == 1, (line, log)
    assert "[rank 1]" not in log, log
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in one.iterdir())
    ranks = [load_file(dump / f"rank{r}.safetensors") for r in (0, 1)]
    saved = load_file(run / "last.safetensors")
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 10
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name  # parameters and BatchNorm statistics
        if name in saved:
            assert torch.equal(value, saved[name]), name
    assert json.loads((run / "config.json").read_text())["world_size"] == 2


def test_torchrun_runs_only_train(monkeypatch, capsys):
    from faceattrs.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["evaluate", "--model", "runs/none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "under torchrun only train" in err, err


def test_distill_loss_blends_hard_and_soft_targets():
    torch.manual_seed(0)
    out = {"gender": torch.randn(6, 2), "ethnicity": torch.randn(6, 5)}
    batch = {"gender": torch.randint(0, 2, (6,)), "ethnicity": torch.randint(0, 5, (6,))}
    soft = {f"teacher_{h}": torch.rand(6, k).softmax(1) for h, k in T.HEADS.items()}
    w, sm = {"gender": 0.4, "ethnicity": 2.5}, {"ethnicity": 0.12}
    plain, _ = T.heads_loss(w, sm)(out, batch)
    assert T.distill_loss(w, sm, 0.0, 2.0)(out, {**batch, **soft})[0] == pytest.approx(plain)
    assert T.distill_loss(w, sm, 0.7, 2.0)(out, batch)[0] == pytest.approx(plain)  # no teacher
    got, parts = T.distill_loss(w, sm, 1.0, 2.0)(out, {**batch, **soft})
    p = soft["teacher_gender"]
    kl = (p * (p.log() - torch.log_softmax(out["gender"] / 2, 1))).sum(1).mean() * 4
    assert parts["gender"] == pytest.approx(kl.item(), rel=1e-5)
    assert got == pytest.approx(sum(w[h] * parts[h] for h in w))


def test_fit_distils_from_a_teacher_run(tmp_path):
    faces = synthetic_faceset(80)
    T.fit(faces, tmp_path / "teacher", tiny_cfg(epochs=1))
    images = torch.from_numpy(faces.images[:10])
    soft = T.teacher_targets(f"{tmp_path / 'teacher'}, {tmp_path / 'teacher'}", images, 2.0)
    model, _ = load_model(tmp_path / "teacher", "best")
    from faceattrs.model import predict

    a, b = predict(model, images), predict(model, images.flip(-1))
    for h in T.HEADS:
        want = (torch.from_numpy(a[h] / 2).softmax(1) + torch.from_numpy(b[h] / 2).softmax(1)) / 2
        assert torch.allclose(soft[f"teacher_{h}"], want, atol=1e-6)
    cfg = tiny_cfg(epochs=1, teachers=str(tmp_path / "teacher"))
    T.fit(faces, tmp_path / "student", cfg)
    saved = json.loads((tmp_path / "student" / "config.json").read_text())["config"]
    assert saved["teachers"] == str(tmp_path / "teacher") and saved["distill_weight"] == 0.5
    with pytest.raises(T.TrainError, match="teacher"):
        T.fit(faces, tmp_path / "s2", tiny_cfg(epochs=1, teachers=str(tmp_path / "none")))


def test_teacher_targets_are_kept_for_a_resume(tmp_path, monkeypatch):
    faces = synthetic_faceset(80)
    T.fit(faces, tmp_path / "teacher", tiny_cfg(epochs=1))
    cfg = tiny_cfg(epochs=1, teachers=str(tmp_path / "teacher"))
    T.fit(faces, tmp_path / "student", cfg)
    images = torch.from_numpy(faces.images[faces.indices("train")])
    saved = load_file(str(tmp_path / "student" / T.TEACHERS_FILE))
    want = T.teacher_targets(cfg.teachers, images, cfg.distill_temperature)
    assert saved.keys() == want.keys()
    assert all(torch.allclose(saved[k], want[k], atol=1e-6) for k in want)

    calls = []
    real = losses.teacher_targets
    monkeypatch.setattr(losses, "teacher_targets", lambda *a: calls.append(a) or real(*a))
    soft, _, cached = losses.teacher_targets_cached(tmp_path / "student", cfg, images)
    assert cached and not calls and all(torch.equal(soft[k], saved[k]) for k in saved)
    # another temperature, other images or retrained teachers: computed again
    hot = tiny_cfg(epochs=1, teachers=cfg.teachers, distill_temperature=3.0)
    assert not losses.teacher_targets_cached(tmp_path / "student", hot, images)[2]
    assert not losses.teacher_targets_cached(tmp_path / "student", cfg, images[:-1])[2]
    T.fit(faces, tmp_path / "teacher2", tiny_cfg(epochs=1, seed=1))
    (tmp_path / "teacher" / "best.safetensors").write_bytes(
        (tmp_path / "teacher2" / "best.safetensors").read_bytes()
    )
    assert not losses.teacher_targets_cached(tmp_path / "student", cfg, images)[2]
    assert len(calls) == 3


def test_age_bin_loss_adds_the_bins_cross_entropy(tmp_path):
    """age_bin: + weight x -log(the year probabilities summed over the true age bin)."""
    cfg = tiny_cfg(age_head=True, age_l1=0.0, age_smoothing=0.0, age_bin=0.5)
    edges = [18.0, 30.0]  # bins 0-17, 18-29, 30+
    logits = torch.randn(3, T.AGE_YEARS)
    out = {"gender": torch.zeros(3, 2), "ethnicity": torch.zeros(3, 5), "age": logits}
    batch = {"gender": torch.tensor([0, 1, 0]), "ethnicity": torch.tensor([0, 1, 2]),
             "age": torch.tensor([5, 18, 70])}  # fmt: skip
    _, parts = T.with_age_head(T.multitask_loss(cfg), cfg, edges)(out, batch)
    p = logits.softmax(1)
    bins = [p[0, :18].sum(), p[1, 18:30].sum(), p[2, 30:].sum()]
    want = (
        torch.nn.functional.cross_entropy(logits, batch["age"])
        - 0.5 * torch.log(torch.stack(bins)).mean()
    )
    assert parts["age"].item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(FaceattrsError, match="edges"):
        T.with_age_head(T.multitask_loss(cfg), cfg)
    with pytest.raises(cfgmod.ConfigError, match="age_head"):
        T.resolve_config("cpu", ["age_bin=0.5"])
    # a short run with it trains and records its setting
    T.fit(synthetic_faceset(60), tmp_path / "run", tiny_cfg(epochs=1, age_head=True, age_bin=0.5))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["age_bin"] == 0.5


def test_init_starts_from_another_models_weights(tmp_path, monkeypatch):
    """init=RUN (or an ensemble's member, or "default"): the first weights are that
    network's, recorded with its file hash, kept through a resume; a network of another
    design, a missing folder or a member out of range is one clear error."""
    from faceattrs.ensemble import build_ensemble

    faces = synthetic_faceset(80)
    for seed in (0, 1):
        T.fit(faces, tmp_path / f"a{seed}", tiny_cfg(epochs=1, seed=seed))
    build_ensemble([tmp_path / "a0", tmp_path / "a1"], tmp_path / "pair")

    def fresh(**kw):
        torch.manual_seed(7)
        return FaceResNet(T.model_config(tiny_cfg(**kw)))

    for source, member, want in (("a1", 0, "a1"), ("pair", 1, "a1"), ("pair", 0, "a0")):
        model = fresh()
        rec = T.load_init(model, str(tmp_path / source), member)
        ref = load_file(str(tmp_path / want / "best.safetensors"))
        got = model.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), (source, member)
        assert rec["member"] == member and len(rec["weights_sha256"]) == 64
    # the bundled 48x48 model's members (by name): width 0.5, three heads
    model = fresh(width=0.5, age_head=True)
    T.load_init(model, "utk48", 1)
    from faceattrs.bundle import resolve

    bundled = resolve("utk48").load_multitask()[0].members[1].state_dict()
    assert all(torch.equal(model.state_dict()[k], bundled[k].float()) for k in bundled)

    for kw, match in (
        (
            {"width": 0.25},
            "width 0.125 with heads gender, ethnicity; these settings give width 0.25",
        ),
        ({"age_head": True}, "set width= and age_head= to match"),
    ):
        with pytest.raises(T.TrainError, match=match):
            T.load_init(fresh(**kw), str(tmp_path / "a0"))
    with pytest.raises(T.TrainError, match="holds 2 network"):
        T.load_init(fresh(), str(tmp_path / "pair"), 2)
    with pytest.raises(T.TrainError, match="init .*does not exist"):
        T.load_init(fresh(), str(tmp_path / "none"))
    with pytest.raises(cfgmod.ConfigError, match="init_member"):
        tiny_cfg(init_member=-1)

    # a run trains from those weights: with a learning rate of ~0 it ends where a1 was
    T.fit(faces, tmp_path / "still", tiny_cfg(epochs=1, lr=1e-12, weight_decay=0.0,
                                              init=str(tmp_path / "a1")))  # fmt: skip
    still = load_file(str(tmp_path / "still" / "best.safetensors"))
    a0, a1 = (load_file(str(tmp_path / f"a{i}" / "best.safetensors")) for i in (0, 1))
    learned = [k for k in a1 if "running" not in k and "num_batches" not in k]
    assert all(torch.allclose(still[k], a1[k], atol=1e-6) for k in learned)
    assert not all(torch.allclose(still[k], a0[k], atol=1e-3) for k in learned)

    # a run started from a0 records it, and a resume keeps the record
    cfg = tiny_cfg(epochs=2, patience=10, init=str(tmp_path / "a0"))
    real_save = state.save_checkpoint

    def crash_after_epoch_1(run_dir, name, model, meta):
        real_save(run_dir, name, model, meta)
        if name == "last":
            raise KeyboardInterrupt

    monkeypatch.setattr(state, "save_checkpoint", crash_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        T.fit(faces, tmp_path / "b", cfg)
    monkeypatch.undo()
    first = json.loads((tmp_path / "b" / "config.json").read_text())["init"]
    assert first["source"] == str(tmp_path / "a0") and first["member"] == 0
    T.fit(faces, tmp_path / "b", cfg, resume=True)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["init"] == first
