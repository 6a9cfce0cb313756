"""Training a new head on the multitask backbone: head only, then the whole network.

Used by both age models (the coarse bin classifier and the direct head). Stage 1 freezes
the backbone (its batch-norm statistics too) and trains only the new head; stage 2
fine-tunes everything at a lower learning rate with warm-up + cosine, early-stopped on a
validation score. The best model over both stages is kept. Augmentation is the
multitask model's (``augment.Augmenter`` built from its run's settings). One JSON line
per epoch goes to the history file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..dataset import FaceSet
from ..io import write_text_atomic
from ..model import FaceResNet

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


def batches(faces: FaceSet, targets: dict[str, np.ndarray], batch_size: int, seed: int,
            device, max_batches: int = 0):
    """Shuffled dict batches: ``images`` uint8 ``(B, 48, 48)``, ``ethnicity`` and each target,
    as tensors on ``device``; the order depends only on ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(faces), generator=gen)
    images = torch.as_tensor(faces.images)
    eth = torch.as_tensor(faces.ethnicity.astype(np.int64))
    tgt = {k: torch.as_tensor(v) for k, v in targets.items()}
    for i, idx in enumerate(order.split(batch_size)):
        if max_batches and i >= max_batches:
            return
        yield {"images": images[idx].to(device), "ethnicity": eth[idx].to(device),
               **{k: v[idx].to(device) for k, v in tgt.items()}}


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

    ``loss_fn(outputs, batch)``: outputs = the model's dict of logits, batch = a dict from
    :func:`batches` plus ``x`` (the augmented input). Returns the best network (eval mode)
    and a summary (best epoch / stage / score, epochs run, seconds).
    """
    from ..train import EarlyStopping

    net.to(device)
    augment = make_augmenter(mt_meta, train, device, cfg.seed)
    rows: list[dict] = []
    best = {"score": None, "stage": 0, "epoch": 0, "state": None}
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)

    def run_epoch(stage, epoch, model, opt, sched, lr):
        t0 = time.time()
        seed = cfg.seed * 10_000 + stage * 1000 + epoch
        stats = _train_epoch(model, loss_fn, batches(train, targets, cfg.batch_size, seed,
                                                     device, cfg.max_batches),
                             opt, sched, augment, device)
        scores = score_fn(net)
        row = {"model": name, "stage": stage, "epoch": epoch, "lr": lr, **stats, **scores,
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        _append_jsonl(history_path, rows)
        log.info("%s stage %d epoch %d: %s", name, stage, epoch,
                 ", ".join(f"{k} {v:.4f}" for k, v in {**stats, **scores}.items()))
        if best["score"] is None or better(scores[monitor], best["score"]):
            best.update(score=scores[monitor], stage=stage, epoch=epoch,
                        state=copy.deepcopy(net.state_dict()))
        return scores[monitor]

    # Stage 1: the backbone frozen, batch-norm statistics included.
    head_only = HeadOnly(net)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.head_lr,
                            weight_decay=cfg.weight_decay)
    for epoch in range(1, cfg.head_epochs + 1):
        run_epoch(1, epoch, head_only, opt, None, cfg.head_lr)
    for p in net.parameters():
        p.requires_grad_(True)

    # Stage 2: everything, lower learning rate, warm-up + cosine, early stopping.
    if cfg.finetune_epochs > 0:
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.finetune_lr,
                                weight_decay=cfg.weight_decay)
        steps = cfg.finetune_epochs * _n_batches(len(train), cfg)
        sched = warmup_cosine(opt, cfg.warmup_epochs * _n_batches(len(train), cfg), steps)
        stopper = EarlyStopping(monitor=monitor, mode=mode, patience=cfg.patience,
                                min_delta=cfg.min_delta)
        for epoch in range(1, cfg.finetune_epochs + 1):
            value = run_epoch(2, epoch, net, opt, sched, opt.param_groups[0]["lr"])
            if stopper.step(value):
                log.info("%s: early stop after stage-2 epoch %d", name, epoch)
                break
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    summary = {"best_stage": best["stage"], "best_epoch": best["epoch"], monitor: best["score"],
               "epochs": len(rows), "seconds": round(sum(r["seconds"] for r in rows), 1)}
    return net.eval(), summary


def warmup_cosine(opt, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base rate, then cosine decay to zero (per optimizer step)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _n_batches(n: int, cfg) -> int:
    full = math.ceil(n / cfg.batch_size)
    return min(full, cfg.max_batches) if cfg.max_batches else full


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def make_augmenter(mt_meta: dict, train: FaceSet, device, seed: int):
    """PLACEHOLDER until augment.Augmenter lands."""
    from ..augment import normalise

    return lambda images, ethnicity: normalise(images)


def _train_epoch(model, loss_fn, batch_iter, opt, sched, augment, device) -> dict:
    """PLACEHOLDER until engine.train_one_epoch lands."""
    model.train()
    total, n = 0.0, 0
    for batch in batch_iter:
        batch["x"] = augment(batch["images"], batch["ethnicity"])
        loss = loss_fn(model(batch["x"]), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += float(loss) * len(batch["x"])
        n += len(batch["x"])
    return {"train_loss": total / max(n, 1)}
