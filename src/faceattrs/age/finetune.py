"""Training a new head on the multitask backbone: head only, then the whole network.

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

from .. import config as cfgmod
from ..augment import AugmentConfig, Augmenter, minority_classes
from ..dataset import FaceSet
from ..devices import use_bf16
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


class HeadOnly(nn.Module):
    """Wraps a network so that ``train()`` leaves its frozen backbone in eval mode."""

    def __init__(self, net: FaceResNet):
        super().__init__()
        self.net = net
        for name, p in net.named_parameters():
            p.requires_grad_(not name.startswith(BACKBONE))

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.stem.eval()
        self.net.stages.eval()
        return self

    def forward(self, x):
        return self.net(x)


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

    # Stage 1: only the new head learns; the backbone (batch-norm statistics too) is frozen.
    torch.manual_seed(cfg.seed)
    head_only = HeadOnly(net)
    opt = make_optimizer(
        [p for p in net.parameters() if p.requires_grad], cfg.head_lr, cfg.weight_decay
    )
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
