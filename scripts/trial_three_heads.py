"""Trial: one network with three heads (gender, ethnicity, age) instead of two backbones.

    python scripts/trial_three_heads.py --data local/prepared --out runs/three_heads \\
        width=0.25 epochs=28 lr=1.5e-3 warmup_epochs=2 threads=1

The multitask recipe (``faceattrs train`` settings, same augmentation, sampling and
schedule) with a third head: age as a distribution over whole years 0..116 (cross-entropy
with label smoothing, plus ``--age-l1`` x the L1 error of its expected value); the age
estimate is that expectation, clipped to the age model's range. Per epoch it validates
gender and ethnicity (mean macro-F1, the multitask score), age MAE, CS@5 and 6-bin
accuracy (bins from training-age quantiles, as ``faceattrs train-age``), and writes
``history.csv``; at the end ``summary.json`` holds the epoch of the best multitask score
with its age figures. ``--ema DECAY`` validates and saves a weight average, as
``faceattrs train ema=DECAY``. The network of the best-score epoch is saved as
``best.safetensors`` / ``best.json`` (a FaceResNet checkpoint with heads gender, ethnicity
and age). ``--mix mixup|cutmix`` mixes each batch (with probability ``--mix-prob``) with a
shuffled copy of itself after augmentation, one lambda ~ Beta(``--mix-alpha``) per batch
(Zhang et al. 2018; Yun et al. 2019), and weighs the losses of both label sets by it.
Validation split only: a trial for choosing a design, not a bundle.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from faceattrs.age.bins import assign_bins, quantile_edges
from faceattrs.age.config import AgeConfig
from faceattrs.age.direct import expected_age
from faceattrs.augment import Augmenter, minority_classes
from faceattrs.checkpoint import save_checkpoint
from faceattrs.engine import autocast, train_one_epoch
from faceattrs.inputs import normalise
from faceattrs.loop import (
    epoch_order,
    make_optimizer,
    make_scheduler,
    sampler_weights,
    seed_epoch,
    select_device,
    use_bf16,
)
from faceattrs.metrics import scores_from_confusion
from faceattrs.model import FaceResNet
from faceattrs.prepare import data_key, load_prepared
from faceattrs.train import (
    AGE_YEARS,
    HEADS,
    _split_tensors,
    make_ema,
    model_config,
    multitask_loss,
    resolve_config,
    with_age_head,
)

N_AGE = AGE_YEARS  # whole years 0..116
CLIP = (AgeConfig.min_age, AgeConfig.max_age)  # the age models' range


@torch.no_grad()
def validate(model, val, edges, bf16, device) -> dict[str, float]:
    model.eval()
    preds = {h: [] for h in HEADS}
    ages = []
    for s in range(0, len(val["image"]), 512):
        x = normalise(val["image"][s : s + 512])
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
            out = model(x)
        for h in HEADS:
            preds[h].append(out[h].float().argmax(1))
        ages.append(expected_age(out["age"]).clip(*CLIP))
    row = {}
    for h, k in HEADS.items():
        p = torch.cat(preds[h])
        cm = torch.bincount(val[h] * k + p, minlength=k * k).reshape(k, k)
        sc = scores_from_confusion(cm.tolist())
        row[f"val_{h}_accuracy"], row[f"val_{h}_macro_f1"] = sc["accuracy"], sc["macro_f1"]
    row["val_score"] = sum(row[f"val_{h}_macro_f1"] for h in HEADS) / len(HEADS)
    age = torch.cat(ages).cpu().numpy()
    true = val["age"].cpu().numpy().astype(np.float64)
    err = np.abs(age - true)
    row["val_age_mae"] = float(err.mean())
    row["val_age_cs5"] = float((err <= 5).mean())
    row["val_age_bin_accuracy"] = float(
        (assign_bins(age, edges) == assign_bins(true, edges)).mean()
    )
    return row


def mix_batch(x, mode: str, alpha: float, rng: np.random.Generator):
    """``(mixed x, permutation, lambda)``: ``lambda x + (1 - lambda) x[perm]`` (mixup) or
    ``x`` with one box of ``x[perm]`` pasted in (cutmix; lambda = the share of ``x`` left)."""
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 0.5
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    if mode == "mixup":
        return lam * x + (1 - lam) * x[perm], perm, lam
    h, w = x.shape[-2:]
    bh, bw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh - bh // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw - bw // 2, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, perm, 1 - (y1 - y0) * (x1 - x0) / (h * w)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder written by faceattrs prepare")
    ap.add_argument("--out", required=True, help="new folder for history.csv, summary.json")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--age-weight", type=float, default=1.0)
    ap.add_argument("--age-l1", type=float, default=0.1, help="weight of |E[age] - age|")
    ap.add_argument("--age-smoothing", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.0, help="weight-average decay (0 = off)")
    ap.add_argument("--mix", choices=("none", "mixup", "cutmix"), default="none")
    ap.add_argument("--mix-alpha", type=float, default=1.0, help="Beta(alpha, alpha) lambda")
    ap.add_argument("--mix-prob", type=float, default=0.5, help="share of batches mixed")
    ap.add_argument("settings", nargs="*", help="faceattrs train overrides, KEY=VALUE")
    a = ap.parse_args(argv)
    cfg = replace(
        resolve_config(a.preset, a.settings), age_head=True, age_weight=a.age_weight,
        age_l1=a.age_l1, age_smoothing=a.age_smoothing,
    )  # fmt: skip
    out = Path(a.out)
    if out.exists():
        print(f"trial_three_heads: {out} exists; choose another --out", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    bf16 = use_bf16(cfg.bf16, device)
    faces = load_prepared(a.data)
    train, val = (_split_tensors(faces, s, 0, cfg.seed, device, age=True) for s in ("train", "val"))
    edges = quantile_edges(train["age"].cpu().numpy(), 6)
    eth = train["ethnicity"].cpu().numpy()
    augmenter = Augmenter(cfg.augment, minority_classes(eth, cfg.augment.minority_ratio))
    weights = sampler_weights(eth) if cfg.balanced else None

    torch.manual_seed(cfg.seed)
    model = FaceResNet(model_config(cfg))  # gender, ethnicity and age
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    steps = math.ceil(len(train["image"]) / cfg.batch_size)
    scheduler = make_scheduler(
        optimizer, max(1, round(cfg.warmup_epochs * steps)), cfg.epochs * steps, 0.0
    )
    ema = make_ema(model, a.ema)
    served = ema.module if ema is not None else model
    one_loss = with_age_head(multitask_loss(cfg), cfg)  # the loss of `train age_head=true`

    mix_rng = np.random.default_rng(cfg.seed)

    def prepare(batch):
        x = augmenter(batch["image"], batch["ethnicity"])
        if a.mix != "none" and mix_rng.random() < a.mix_prob:
            x, batch["mix_perm"], batch["mix_lam"] = mix_batch(x, a.mix, a.mix_alpha, mix_rng)
        return x

    def loss_fn(outputs, batch):
        if "mix_perm" not in batch:
            return one_loss(outputs, batch)
        perm, lam = batch["mix_perm"], batch["mix_lam"]
        other = {k: v[perm] for k, v in batch.items() if k in (*HEADS, "age")}
        la, pa = one_loss(outputs, batch)
        lb, pb = one_loss(outputs, other)
        return lam * la + (1 - lam) * lb, {k: lam * pa[k] + (1 - lam) * pb[k] for k in pa}

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(
        {"data": str(Path(a.data).resolve()), "data_key": data_key(a.data), "settings": a.settings, "preset": a.preset, "age_weight": a.age_weight,
         "age_l1": a.age_l1, "age_smoothing": a.age_smoothing, "ema": a.ema, "mix": a.mix,
         "mix_alpha": a.mix_alpha, "mix_prob": a.mix_prob, "edges": edges.tolist(),
         "bf16": bf16}, indent=2))  # fmt: skip
    history, t0 = [], time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t = time.perf_counter()
        seed_epoch(cfg.seed, epoch)
        order = epoch_order(weights, len(train["image"]), cfg.seed, epoch).to(device)
        tr = train_one_epoch(
            model, loss_fn, train, order, optimizer,
            prepare, batch_size=cfg.batch_size,
            scheduler=scheduler, bf16=bf16, channels_last=True, progress=False,
            max_batches=cfg.max_batches,
            after_step=(lambda: ema.update_parameters(model)) if ema is not None else None,
        )  # fmt: skip
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_loss_age": tr["loss_age"],
               **validate(served, val, edges, bf16, device),
               "seconds": time.perf_counter() - t}  # fmt: skip
        history.append(row)
        if row["val_score"] > max((r["val_score"] for r in history[:-1]), default=-1.0):
            save_checkpoint(out, "best", served, {"epoch": epoch, "score": row["val_score"],
                                                  "age_edges": edges.tolist()})  # fmt: skip
        print(
            f"epoch {epoch}/{cfg.epochs} score {row['val_score']:.4f} gender acc "
            f"{row['val_gender_accuracy']:.4f} age MAE {row['val_age_mae']:.3f} "
            f"bin acc {row['val_age_bin_accuracy']:.3f} {row['seconds']:.0f} s",
            flush=True,
        )
        with (out / "history.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            w.writeheader()
            w.writerows(history)
    best = max(history, key=lambda r: r["val_score"])
    summary = {"best_score_epoch": best, "best_mae": min(r["val_age_mae"] for r in history),
               "wall_s": round(time.perf_counter() - t0), "n_val": len(val["image"])}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
