"""One training run of the multitask model, as the reference says: :func:`fit` trains on
the ``train`` split, chooses the best epoch on ``val`` and writes the run folder::

    RUN/config.json        resolved config + data path
    RUN/best.{safetensors,json}, RUN/last.{safetensors,json}, RUN/last_state.safetensors
    RUN/history.csv, RUN/history.png

Run it with ``faceattrs train --data PREPARED --out runs/cpu --preset cpu``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as cfgmod
from ..age.bins import quantile_edges
from ..age.direct import HEAD as AGE_HEAD
from ..augment import Augmenter, minority_classes
from ..dataset import FaceSet
from ..devices import check_device, select_device, use_bf16
from ..exceptions import FaceattrsError
from ..inputs import class_names
from ..io import clean_stale_temps, write_json_atomic
from ..model import build_model
from ..prepare import data_key
from . import ddp
from .config import AGE_YEARS, HEADS, TrainConfig, TrainError, class_heads, model_config
from .loop import (
    EarlyStopping,
    epoch_order,
    evaluate_heads,
    make_optimizer,
    make_scheduler,
    mix_seed,
    run_epochs,
    sampler_weights,
    seed_epoch,
    train_one_epoch,
)
from .losses import multitask_loss, save_teacher_targets, teacher_targets_cached, with_age_head
from .state import AGE_COLUMNS, check_fresh, resume_run, save_epoch
from .weights import FrozenBackbone, backbone_features, freeze_backbone, load_init, make_ema

log = logging.getLogger(__name__)


def fit(
    faces: FaceSet,
    out_dir: str | Path,
    cfg: TrainConfig,
    resume: bool = False,
    data_ref: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on the ``train`` split, choose the best epoch on ``val``, write ``out_dir``.

    With ``resume=True`` the run continues after the epoch saved in ``last_state``; the
    per-epoch seeding makes the result identical to an uninterrupted run (same device).
    Under ``torchrun`` every rank trains on its share and only rank 0 writes.
    Returns ``{"best_epoch", "best_score", "epochs_run", "stopped_early", ...}``.
    """
    out_dir = Path(out_dir)
    check_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _fit(faces, out_dir, cfg, resume, data_ref, progress)
    finally:
        torch.set_num_threads(threads)
        if (out_dir / "history.csv").exists() and ddp.rank() == 0:
            _plot(out_dir)  # also after an interruption


def split_tensors(
    faces: FaceSet, split: str, limit: int, seed: int, device, age: bool = False, heads=None
) -> dict:
    """Images and one label tensor per head of ``heads`` (names; default the reference's:
    the FaceSet's labels of that name) and the ethnicity (sampling and augmentation
    stratify by it), and the ages in whole years (clipped to the age head's range) when
    ``age``."""
    idx = faces.indices(split)
    if limit and len(idx) > limit:
        rng = np.random.default_rng(mix_seed(seed, 3))
        idx = np.sort(rng.choice(idx, limit, replace=False))
    names = dict.fromkeys([*(heads or HEADS), "ethnicity"])
    missing = [h for h in names if h not in faces.labels]
    if missing:
        raise TrainError(
            f"the data has no labels for head {missing[0]!r}: a prepared folder holds them "
            f"as the array label_{missing[0]} of faces.npz"
        )
    labels = {h: faces.labels[h][idx].astype(np.int64) for h in names}
    if age:
        labels[AGE_HEAD] = np.clip(faces.age[idx].astype(np.int64), 0, AGE_YEARS - 1)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(faces.images[idx])).to(device),
        **{h: torch.from_numpy(v).to(device) for h, v in labels.items()},
    }


@dataclass
class _Run:
    """What one run trains with, built once by :func:`_fit`."""

    cfg: TrainConfig
    out_dir: Path
    data_ref: str | None
    progress: bool
    device: torch.device
    rank: int
    world: int
    bf16: bool
    train: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    evals: dict = field(default_factory=dict)  # this session's validation results, by epoch
    minority: tuple = ()  # the ethnicity classes augmented more
    augmenter: Any = None
    weights: torch.Tensor | None = None  # the sampler's, None = plain shuffle
    model: Any = None
    net: Any = None  # the model as trained: in DDP, compiled
    ema: Any = None  # the weight average, or None
    optimizer: Any = None
    scheduler: Any = None
    stopper: Any = None
    loss_fn: Any = None
    age_edges: list | None = None
    init: dict | None = None  # where the first weights came from (config.json's "init")
    # freeze=backbone without augmentation: train["image"] and val["image"] hold the
    # backbone's features, computed once, and the epochs run the heads alone on them
    cached: bool = False
    scored: Any = None  # what validation runs: ``served``, or its heads on the features

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def served(self) -> torch.nn.Module:  # evaluated, saved as best/last
        return self.ema.module if self.ema is not None else self.model


def _fit(faces, out_dir: Path, cfg: TrainConfig, resume, data_ref, progress) -> dict[str, Any]:
    device = select_device(cfg.device)
    rank, world = ddp.init_distributed(device)
    run = _Run(cfg, out_dir, data_ref, progress, device, rank, world, use_bf16(cfg.bf16, device))
    soft, teachers_key, cached = _load_data(run, faces)
    _build(run, resume)
    start_epoch = 1
    if run.main:
        clean_stale_temps(out_dir)  # of a killed run
    if resume:
        start_epoch, run.history = resume_run(out_dir, run.model, run.optimizer, run.scheduler,
                                              run.stopper, run.main, run.ema)  # fmt: skip
    else:
        check_fresh(out_dir)
    _write_config(run, resume)
    if run.main and cfg.teachers and not cached:  # a resume reads them back instead
        save_teacher_targets(out_dir, soft, teachers_key)
    log.info(
        "training %d %s faces (val %d) on %s x%d, bf16=%s, width=%s, blocks=%s, epochs %d-%d, "
        "minority=%s", len(run.train["image"]), run.model.cfg.input.describe(),
        len(run.val["image"]), device, world, run.bf16, cfg.width,
        ",".join(map(str, cfg.blocks)), start_epoch, cfg.epochs, run.minority,
    )  # fmt: skip
    trained, run.scored = run.model, run.served
    if cfg.freeze:  # the backbone's weights are final (init's, or a resume's): use them
        _frozen_path(run)
        trained = FrozenBackbone(run.model, features=run.cached)
        if run.cached:
            run.scored = FrozenBackbone(run.served, features=True)
    run.net = ddp.wrap(trained, device, world)
    if cfg.compile:
        run.net = torch.compile(run.net)

    t0 = time.perf_counter()
    epochs = range(start_epoch, cfg.epochs + 1)
    stopped_early = run_epochs(
        epochs, lambda e: _epoch(run, e), run.stopper, lambda r, i: _on_epoch(run, r, i)
    )
    if stopped_early:
        log.info("early stop: no gain for %d epochs, best epoch %d", cfg.patience,
                 run.stopper.best_epoch)  # fmt: skip
    summary = {
        "best_epoch": run.stopper.best_epoch, "best_score": run.stopper.best,
        "epochs_run": len(run.history), "stopped_early": stopped_early,
        "seconds": time.perf_counter() - t0, "out_dir": str(out_dir), "bf16": run.bf16,
        "device": str(device), "world_size": world,
    }  # fmt: skip
    ddp.barrier()
    return summary


def _load_data(run: _Run, faces: FaceSet) -> tuple[dict, str | None, bool]:
    """The splits on the device (and the teachers' soft targets among the training ones);
    returns ``(soft targets, their key, read from the run folder)``."""
    cfg, device = run.cfg, run.device
    try:
        faces.require(model_config(cfg).input, run.data_ref or "the data")
    except FaceattrsError as e:
        raise TrainError(str(e)) from None
    heads = class_heads(cfg)
    run.train = split_tensors(faces, "train", cfg.limit, cfg.seed, device, cfg.age_head, heads)
    run.val = split_tensors(faces, "val", cfg.limit, cfg.seed + 1, device, cfg.age_head, heads)
    n_train, n_val = len(run.train["image"]), len(run.val["image"])
    if n_train < run.world or n_val == 0:
        raise TrainError(
            f"need a train and a val split (found {n_train} train, {n_val} val faces); "
            "pass data prepared by `faceattrs prepare`"
        )
    soft, key, cached = {}, None, False
    if cfg.teachers:
        log.info("distilling from %s (T=%s, weight %s)", cfg.teachers, cfg.distill_temperature,
                 cfg.distill_weight)  # fmt: skip
        soft, key, cached = teacher_targets_cached(run.out_dir, cfg, run.train["image"])
        run.train.update(soft)
    return soft, key, cached


def _build(run: _Run, resume: bool) -> None:
    """Augmenter, sampler, model (from ``init``), optimizer, schedule, early stopping, loss
    and weight average, in the order that fixes the random draws."""
    cfg, device = run.cfg, run.device
    eth_train = run.train["ethnicity"].cpu().numpy()
    run.minority = minority_classes(eth_train, cfg.augment.minority_ratio)
    run.augmenter = Augmenter(cfg.augment, run.minority, model_config(cfg).input).to(device)
    run.weights = sampler_weights(eth_train) if cfg.balanced else None

    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_model(model_config(cfg)).to(device)
    if cfg.init and not resume:  # a resume reads its own weights back
        run.init = load_init(model, cfg.init, cfg.init_member)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run.model = model
    params = freeze_backbone(model) if cfg.freeze else model.parameters()
    run.optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay)
    share = len(run.train["image"]) // run.world
    steps = math.ceil(share / cfg.batch_size)
    if cfg.max_batches > 0:
        steps = min(steps, cfg.max_batches)
    run.scheduler = make_scheduler(
        run.optimizer, max(1, round(cfg.warmup_epochs * steps)), cfg.epochs * steps,
        cfg.min_lr / cfg.lr,
    )  # fmt: skip
    run.stopper = EarlyStopping("val_score", "max", cfg.patience, cfg.min_delta)
    run.loss_fn = multitask_loss(cfg)
    if cfg.age_head:  # the bins calibrate gives the age head: training-age sextiles
        edges = quantile_edges(run.train[AGE_HEAD].cpu().numpy(), 6)
        run.age_edges = [float(e) for e in edges]
        run.loss_fn = with_age_head(run.loss_fn, cfg, run.age_edges)
    run.ema = make_ema(model, cfg.ema)


def _frozen_path(run: _Run) -> None:
    """freeze=backbone: without augmentation, replace both splits' faces by the backbone's
    features (computed once, as the whole network's forward would give them to the heads);
    with it, every step runs the whole network. Says which, once."""
    cfg = run.cfg
    if cfg.augment.enabled:
        log.info("freeze=backbone: augmentation on, so every step runs the whole network; "
                 "only the heads train (set augment.enabled=false to compute the backbone's "
                 "features once)")  # fmt: skip
        return
    t0 = time.perf_counter()
    settings = {"batch_size": cfg.eval_batch_size, "bf16": run.bf16,
                "channels_last": cfg.channels_last}  # fmt: skip
    # the training faces through the augmenter (off: it only normalises, as in training),
    # validation's uint8 faces as evaluate_heads gives them to the network
    train = backbone_features(
        run.model, run.train, lambda b: run.augmenter(b["image"], b["ethnicity"]), **settings
    )
    val = backbone_features(run.model, run.val, lambda b: b["image"], **settings)
    run.train["image"], run.val["image"], run.cached = train, val, True
    log.info("freeze=backbone, no augmentation: the backbone's %d-d features of %d train and "
             "%d val faces computed once (%.1f s); the epochs train the heads on them",
             train.shape[1], len(train), len(val), time.perf_counter() - t0)  # fmt: skip


def _write_config(run: _Run, resume: bool) -> None:
    """``config.json``: the resolved settings, the data and where the first weights came
    from (a resume keeps the fresh run's record)."""
    cfg, out_dir, ref = run.cfg, run.out_dir, run.data_ref
    run_config = {"data": ref, "data_key": data_key(ref) if ref else None,
                  "world_size": run.world, "bf16": run.bf16, "device": str(run.device),
                  "minority_classes": list(run.minority), "train_faces": len(run.train["image"]),
                  "val_faces": len(run.val["image"]), "config": cfgmod.to_dict(cfg)}  # fmt: skip
    init = run.init
    if resume:  # where the first weights came from, as the fresh run recorded it
        init = json.loads((out_dir / "config.json").read_text()).get("init")
    if init:
        run_config["init"] = init
    if run.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "config.json", run_config)


def _epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """Train one epoch and validate: the epoch's history row."""
    cfg, model, ema = run.cfg, run.model, run.ema
    t_epoch = time.perf_counter()
    seed_epoch(cfg.seed, epoch, run.rank)
    n_train = len(run.train["image"])
    order = epoch_order(run.weights, n_train, cfg.seed, epoch, run.rank, run.world)
    prepare = (lambda batch: batch["image"]) if run.cached else (
        lambda batch: run.augmenter(batch["image"], batch["ethnicity"]))  # fmt: skip
    tr = train_one_epoch(
        run.net, run.loss_fn, run.train, order.to(run.device), run.optimizer, prepare,
        batch_size=cfg.batch_size, scheduler=run.scheduler, bf16=run.bf16,
        channels_last=cfg.channels_last and not run.cached, max_batches=cfg.max_batches,
        progress=f"epoch {epoch}/{cfg.epochs}" if (run.progress and run.main) else False,
        after_step=(lambda: ema.update_parameters(model)) if ema is not None else None,
    )  # fmt: skip
    lr = run.scheduler.get_last_lr()[0]  # the lr of the epoch's last step
    # every rank evaluates (its shard) with rank 0's BatchNorm statistics
    ddp.broadcast_buffers(run.served)
    shard = torch.arange(run.rank, len(run.val["image"]), run.world, device=run.device)
    heads = class_heads(cfg)
    ev = evaluate_heads(
        run.scored, run.val, heads, batch_size=cfg.eval_batch_size, loss_fn=run.loss_fn,
        bf16=run.bf16, channels_last=cfg.channels_last, indices=shard,
        years=AGE_HEAD if cfg.age_head else None,
    )  # fmt: skip
    run.evals[epoch] = ev
    seconds = time.perf_counter() - t_epoch
    return {
        "epoch": epoch, "lr": lr, "seconds": seconds, "images_per_s": tr["images_per_s"],
        "train_loss": tr["loss"], **{f"train_loss_{h}": tr[f"loss_{h}"] for h in heads},
        "val_loss": ev["loss"], "val_score": selection_score(cfg, ev),
        **{f"val_{h}_{m}": ev[h][m] for h in heads for m in ("accuracy", "macro_f1")},
        **(dict(zip(AGE_COLUMNS, (tr[f"loss_{AGE_HEAD}"], ev[AGE_HEAD]["mae"],
                                  ev[AGE_HEAD]["cs5"]), strict=True)) if cfg.age_head else {}),
    }  # fmt: skip


def selection_score(cfg: TrainConfig, ev: dict) -> float:
    """The score that chooses the best epoch: the mean validation macro-F1 of the heads
    that select (the reference: gender and ethnicity)."""
    selecting = [h.name for h in cfg.heads if h.selects]
    return sum(ev[h]["macro_f1"] for h in selecting) / len(selecting)


def _on_epoch(run: _Run, row: dict[str, Any], improved: bool) -> None:
    """Log the epoch; rank 0 saves its files (:func:`save_epoch`) and the figure."""
    cfg = run.cfg
    epoch, score, ev = row["epoch"], row["val_score"], run.evals[row["epoch"]]
    run.history.append(row)
    age = f"  age MAE {ev[AGE_HEAD]['mae']:.2f}" if cfg.age_head else ""
    log.info(
        "epoch %d/%d  loss %.4f  val %s%s  score %.4f%s  %.0f img/s  %.0f s",
        epoch, cfg.epochs, row["train_loss"],
        "  ".join(f"{h} F1 {ev[h]['macro_f1']:.4f}" for h in class_heads(cfg)), age, score,
        "  *best*" if improved else "", row["images_per_s"], row["seconds"],
    )  # fmt: skip
    if not run.main:
        return
    selecting = [h.name for h in cfg.heads if h.selects]
    monitor = f"val mean macro-F1 ({', '.join(selecting)})"
    meta = {"epoch": epoch, "score": score, "monitor": monitor,
            "val": {h.name: {k: ev[h.name][k] for k in ("accuracy", "macro_f1", "confusion")}
                    for h in cfg.heads},
            "data": run.data_ref, "config": cfgmod.to_dict(cfg)}  # fmt: skip
    known = class_names(model_config(cfg).heads)  # what a checkpoint records by default
    names = {**known, **{h.name: list(h.classes) for h in cfg.heads}}
    if names != known:  # another head's, or other class names: the spec's
        meta["class_names"] = names
    if cfg.age_head:  # the bins calibrate gives the age head: training-age sextiles
        meta["age_edges"] = run.age_edges
    save_epoch(run.out_dir, epoch, run.model, run.optimizer, run.scheduler, run.stopper, meta,
               run.history, improved, run.ema)  # fmt: skip
    if row["seconds"] >= 30:  # keep history.png current when it costs little
        _plot(run.out_dir)


def _plot(out_dir: Path) -> None:
    try:
        # matplotlib, heavy: imported only when a figure is drawn
        from ..plots.train import plot_history

        plot_history(out_dir / "history.csv", out_dir / "history.png")
    except Exception as e:  # a figure must never stop a training run
        log.warning("history plot failed: %s", e)
