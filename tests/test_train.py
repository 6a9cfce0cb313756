"""Training runs: the run folder, the network's depth, resume equals an uninterrupted run,
the age head, EMA, freeze=backbone, a one-epoch CLI run on real data. The engine's parts:
test_train_parts.py; DDP: test_train_ddp.py; teachers and init=: test_train_from_models.py."""

from __future__ import annotations

import gzip
import json
import logging

import pytest
import torch
from conftest import synthetic_faceset
from safetensors.torch import load_file
from train_helpers import read_history, tiny_cfg

from faceattrs import config as cfgmod
from faceattrs import training as T
from faceattrs.checkpoint import load_model
from faceattrs.exceptions import FaceattrsError
from faceattrs.model import FaceResNet
from faceattrs.prepare import data_key
from faceattrs.training import run as run_module
from faceattrs.training import state
from faceattrs.training.loop import evaluate_heads
from faceattrs.training.run import split_tensors

# ------------------------------------------------------------------ runs


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
    rows = read_history(run / "history.csv")
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
             read_history(tmp_path / "full" / "history.csv")]  # fmt: skip
    assert strip == [{k: v for k, v in r.items() if k not in timing}
                     for r in read_history(tmp_path / "cut" / "history.csv")]  # fmt: skip
    if frozen:  # its optimiser holds the heads alone: resuming it unfrozen is one line
        with pytest.raises(T.TrainError, match="keep its freeze setting"):
            T.fit(faces, tmp_path / "cut", tiny_cfg(epochs=4, patience=10, ema=ema,
                  age_head=age_head, **{"augment.enabled": False}), resume=True)  # fmt: skip


def test_age_head_run_is_a_bundle_with_its_age_model(tmp_path):
    from faceattrs.age.bins import quantile_edges
    from faceattrs.backends import TorchBackend
    from faceattrs.calibrate import calibrate_run

    faces = synthetic_faceset(80)
    run = tmp_path / "run"
    T.fit(faces, run, tiny_cfg(epochs=2, age_head=True), data_ref="synthetic")
    best = json.loads((run / "best.json").read_text())
    rows = read_history(run / "history.csv")  # the age head's validation figures, per epoch
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
    assert score == pytest.approx(
        float(read_history(run / "history.csv")[-1]["val_score"]), abs=1e-6
    )
    with pytest.raises(T.TrainError, match="keep its ema setting"):
        T.fit(faces, run, tiny_cfg(epochs=3, patience=10, ema=0.0), resume=True)


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
    rows = [read_history(tmp_path / r / "history.csv") for r in ("fast", "slow")]
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
    assert len(read_history(run / "history.csv")) == 1
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["width"] == T.PRESETS["cpu"]["width"]
    assert config["data"] == str(small.resolve())
    cached = next((tmp_path / "cache").rglob("small.csv-*"))  # prepared copy: the same key
    assert config["data_key"] == data_key(small) == data_key(cached) == cached.name[-20:]
    # extend the finished run by one epoch through --resume
    assert main(["train", "--resume", str(run), "--no-progress", "epochs=2"]) == 0
    assert [r["epoch"] for r in read_history(run / "history.csv")] == ["1", "2"]
    assert main(["train", "--data", str(small), "--out", str(run), "bogus=1"]) == 2
    # a run that starts from this one's weights (init=); a missing one: one line, exit 2
    warm = argv[:4] + [str(tmp_path / "warm")] + argv[5:] + [f"init={run}"]
    assert main(warm) == 0
    assert json.loads((tmp_path / "warm" / "config.json").read_text())["init"]["source"] == str(run)
    capsys.readouterr()
    assert main(argv[:4] + [str(tmp_path / "cold")] + argv[5:] + [f"init={tmp_path}/no"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err, err
