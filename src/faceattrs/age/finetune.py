"""Training the age networks: a new head on the multitask backbone (head only, then the
whole network), and the per-bin regressors on its embeddings (:func:`train_regressors`).

Used by both age models (the coarse bin classifier and the direct head). Stage 1 freezes
the backbone (its batch-norm statistics too) and trains only the new head; stage 2
fine-tunes everything at a lower learning rate with warm-up + cosine, early-stopped on a
validation score. The best model over both stages is kept. Augmentation is the
multitask model's (``augment.Augmenter`` built from its run's settings); the loop is the
multitask model's (:func:`faceattrs.training.loop.run_epochs` over its ``train_one_epoch``,
one history row per epoch in the same CSV format,
:class:`faceattrs.training.loop.EarlyStopping`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import config as cfgmod
from ..augment import AugmentConfig, Augmenter, minority_classes
from ..dataset import FaceSet
from ..devices import use_bf16
from ..exceptions import FaceattrsError
from ..model import FaceResNet, ModelConfig
from ..training.loop import (
    EarlyStopping,
    epoch_order,
    make_optimizer,
    make_scheduler,
    run_epochs,
    seed_epoch,
    train_one_epoch,
    write_history,
)
from ..training.weights import FrozenBackbone, freeze_backbone
from .bins import assign_bins
from .regress import BinRegressors

log = logging.getLogger(__name__)

BACKBONE = ("stem.", "stages.")


def from_backbone(mt_model: FaceResNet, heads: dict[str, int]) -> FaceResNet:
    """A new :class:`FaceResNet` with ``heads`` whose backbone weights are copied from
    ``mt_model`` (stem and stages, batch-norm statistics included)."""
    cfg = dataclasses.replace(mt_model.cfg, heads=dict(heads))
    net = FaceResNet(cfg)
    state = {k: v for k, v in mt_model.state_dict().items() if k.startswith(BACKBONE)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("heads.") for k in missing):
        raise RuntimeError(f"backbone mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return net


def augmenter_for(mt_meta: dict, train: FaceSet, device) -> Augmenter:
    """The multitask run's augmentation (its saved ``augment`` settings; the reference's
    when the checkpoint has none), minority classes from these training faces."""
    saved = (mt_meta.get("config") or {}).get("augment")
    aug_cfg = cfgmod.from_dict(AugmentConfig, saved) if saved else AugmentConfig()
    minority = minority_classes(train.ethnicity, aug_cfg.minority_ratio)
    spec = cfgmod.from_dict(ModelConfig, mt_meta.get("model") or {}).input
    return Augmenter(aug_cfg, minority, spec).to(device)


def train_two_stages(
    net: FaceResNet,
    loss_fn: Callable[[dict, dict], torch.Tensor],
    score_fn: Callable[[FaceResNet], dict],
    monitor: str,
    mode: str,
    train: FaceSet,
    targets: dict[str, np.ndarray],
    cfg,
    device,
    mt_meta: dict,
    history_path: Path,
    name: str,
) -> tuple[FaceResNet, dict]:
    """Stage 1 (head only, ``cfg.head_epochs``) then stage 2 (everything,
    ``cfg.finetune_epochs``, early stopping on ``monitor`` of ``score_fn(net)``).

    ``loss_fn(outputs, batch)`` as in :func:`faceattrs.training.loop.train_one_epoch`; the batch
    holds ``image`` (uint8), ``ethnicity`` and each array of ``targets`` (``(N,)`` per
    training face). ``score_fn(net) -> {name: value}`` scores the validation split.
    Returns the best network over both stages (eval mode) and a summary.
    """
    net.to(device)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    bf16 = use_bf16("auto", device)
    augment = augmenter_for(mt_meta, train, device)
    data = {
        "image": torch.from_numpy(np.ascontiguousarray(train.images)).to(device),
        "ethnicity": torch.from_numpy(train.ethnicity.astype(np.int64)).to(device),
        **{k: torch.from_numpy(np.asarray(v)).to(device) for k, v in targets.items()},
    }
    steps = math.ceil(len(train) / cfg.batch_size)
    if cfg.max_batches:
        steps = min(steps, cfg.max_batches)
    rows: list[dict] = []
    # the best network over both stages (same rule as early stopping, without patience)
    best = EarlyStopping(monitor, mode, patience=math.inf)
    best_state = {"stage": 0, "state": None}

    def prepare(batch):
        return augment(batch["image"], batch["ethnicity"])

    def epochs(stage: int, model, opt, sched, n: int, stopper: EarlyStopping) -> None:
        def epoch_fn(epoch: int) -> dict:
            lr = opt.param_groups[0]["lr"]
            seed_epoch(cfg.seed, 100 * stage + epoch)  # augmentation and dropout
            order = epoch_order(None, len(train), cfg.seed, 100 * stage + epoch).to(device)
            tr = train_one_epoch(
                model, loss_fn, data, order, opt, prepare,
                batch_size=cfg.batch_size, scheduler=sched, bf16=bf16,
                channels_last=cfg.channels_last, max_batches=cfg.max_batches,
                progress=f"{name} stage {stage} epoch {epoch}",
            )  # fmt: skip
            return {
                "model": name, "stage": stage, "epoch": epoch, "lr": lr,
                "train_loss": tr["loss"], **score_fn(net),
                "seconds": round(tr["seconds"], 1), "images_per_s": round(tr["images_per_s"], 1),
            }  # fmt: skip

        def on_epoch(row: dict, improved: bool) -> None:
            rows.append(row)
            write_history(history_path, rows, list(rows[0]))
            new_best = best.step(row[monitor])
            scores = {k: v for k, v in row.items() if k.startswith("val_")}
            log.info(
                "%s stage %d epoch %d: loss %.4f, %s%s (%.0f s)",
                name, stage, row["epoch"], row["train_loss"],
                ", ".join(f"{k} {v:.4f}" for k, v in scores.items()),
                "  *best*" if new_best else "", row["seconds"],
            )  # fmt: skip
            if new_best:
                best_state.update(stage=stage, state=copy.deepcopy(net.state_dict()))

        if run_epochs(range(1, n + 1), epoch_fn, stopper, on_epoch):
            log.info("%s: early stop after stage-%d epoch %d", name, stage, stopper.epoch)

    # Stage 1: only the new head learns; the backbone (batch-norm statistics too) is frozen,
    # as a freeze=backbone training run freezes it.
    torch.manual_seed(cfg.seed)
    head_only = FrozenBackbone(net)
    opt = make_optimizer(freeze_backbone(net), cfg.head_lr, cfg.weight_decay)
    no_stop = EarlyStopping(monitor, mode, patience=math.inf)
    epochs(1, head_only, opt, None, cfg.head_epochs, no_stop)
    for p in net.parameters():
        p.requires_grad_(True)

    # Stage 2: everything, at a lower rate, warm-up + cosine, early stopping.
    if cfg.finetune_epochs > 0:
        opt = make_optimizer(net.parameters(), cfg.finetune_lr, cfg.weight_decay)
        sched = make_scheduler(opt, cfg.warmup_epochs * steps, cfg.finetune_epochs * steps)
        stopper = EarlyStopping(monitor, mode, cfg.patience, cfg.min_delta)
        epochs(2, net, opt, sched, cfg.finetune_epochs, stopper)
    if best_state["state"] is not None:
        net.load_state_dict(best_state["state"])
    best_epoch = rows[best.best_epoch - 1]["epoch"] if best.best_epoch else 0
    summary = {
        "best_stage": best_state["stage"],
        "best_epoch": best_epoch,
        monitor: best.best,
        "epochs": len(rows),
        "seconds": round(sum(r["seconds"] for r in rows), 1),
    }
    return net.eval(), summary


# ---------------------------------------------------------------- stage 2: per-bin regressors


def regression_loss(kind: str, delta: float):
    if kind == "l1":
        return nn.L1Loss()
    if kind == "huber":
        return nn.HuberLoss(delta=delta)
    raise FaceattrsError(f"unknown regression loss {kind!r}; use 'l1' or 'huber'")


def train_regressors(
    z_train: np.ndarray,
    age_train: np.ndarray,
    z_val: np.ndarray,
    age_val: np.ndarray,
    edges: np.ndarray,
    cfg,
) -> tuple[BinRegressors, list[dict]]:
    """Fit one regressor per bin on that bin's training embeddings only.

    ``z_*``: ``(N, D)`` float embeddings; ``age_*``: ``(N,)`` years; ``edges``: inner bin
    edges; ``cfg``: an :class:`~faceattrs.age.config.AgeConfig`. Returns the module
    (eval mode, CPU) and one summary dict per bin (sizes, best epoch, validation MAE).
    """
    n_bins = len(edges) + 1
    b_train, b_val = assign_bins(age_train, edges), assign_bins(age_val, edges)
    reg = BinRegressors(z_train.shape[1], n_bins, cfg.reg_hidden, cfg.reg_dropout)
    summaries = []
    threads = torch.get_num_threads()
    # Tiny MLPs: one thread is many times faster than several on a busy machine.
    torch.set_num_threads(1)
    try:
        for k in tqdm(range(n_bins), desc="age regressors", leave=False):
            summaries.append(
                _fit_bin(reg, k, z_train, age_train, b_train, z_val, age_val, b_val, cfg)
            )
    finally:
        torch.set_num_threads(threads)
    return reg.eval(), summaries


def _fit_bin(reg, k, z_train, age_train, b_train, z_val, age_val, b_val, cfg) -> dict:
    """Bin ``k``: select its faces, set its statistics, train its regressor."""
    tr, va = np.flatnonzero(b_train == k), np.flatnonzero(b_val == k)
    if len(tr) == 0:
        raise FaceattrsError(f"age bin {k} has no training faces: choose other bin edges")
    # Targets clipped to the age range the model predicts in.
    y = np.clip(age_train[tr].astype(np.float32), cfg.min_age, cfg.max_age)
    yv = np.clip(age_val[va].astype(np.float32), cfg.min_age, cfg.max_age)
    reg.fit_statistics(k, z_train[tr], y)
    info = _fit_one(reg, k, z_train[tr], y, z_val[va], yv, cfg)
    log.info(
        "age bin %d: %d train, %d val faces, val MAE %.2f (epoch %d)",
        k,
        len(tr),
        len(va),
        info["val_mae"],
        info["best_epoch"],
    )
    return {"bin": k, "n_train": len(tr), "n_val": len(va), **info}


def _fit_one(
    reg: BinRegressors, k: int, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, cfg
) -> dict:
    """Train ``reg.mlps[k]`` on ``(x, y)``; keep the epoch with the lowest validation MAE
    (training MAE when the bin has no validation faces)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + k)
    torch.manual_seed(cfg.seed * 1000 + k)
    for m in reg.mlps[k].modules():  # re-initialise from the seed: bins are independent
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    has_val = len(xv) > 0
    xv = torch.as_tensor(xv, dtype=torch.float32) if has_val else x
    yv = torch.as_tensor(yv, dtype=torch.float32) if has_val else y
    opt = make_optimizer(reg.mlps[k].parameters(), cfg.reg_lr, cfg.reg_weight_decay)
    loss_fn = regression_loss(cfg.reg_loss, cfg.huber_delta)
    stopper = EarlyStopping(monitor="val_mae", mode="min", patience=cfg.reg_patience)
    best_state: dict[str, torch.Tensor] = {}

    def epoch_fn(epoch: int) -> dict:
        reg.mlps[k].train()
        for idx in torch.randperm(len(x), generator=gen).split(cfg.reg_batch_size):
            loss = loss_fn(reg.forward_one(k, x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        reg.mlps[k].eval()
        with torch.no_grad():
            return {"epoch": epoch, "val_mae": float((reg.forward_one(k, xv) - yv).abs().mean())}

    def on_epoch(row: dict, improved: bool) -> None:
        if improved:
            best_state.update({n: t.clone() for n, t in reg.mlps[k].state_dict().items()})

    run_epochs(range(1, cfg.reg_epochs + 1), epoch_fn, stopper, on_epoch)
    reg.mlps[k].load_state_dict(best_state)
    return {
        "val_mae": round(stopper.best, 4),
        "best_epoch": stopper.best_epoch,
        "epochs": stopper.epoch,
        "monitored": "val" if has_val else "train",
    }
