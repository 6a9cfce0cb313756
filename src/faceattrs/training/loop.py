"""The training loop and its parts, shared by every training stage (multitask and age).

- sampling and seeding: :func:`sampler_weights`, :func:`epoch_order`, :func:`seed_epoch`
  (everything random derives from ``(seed, epoch, rank)``, so a resumed run equals an
  uninterrupted one);
- optimisation: :func:`make_optimizer` (AdamW), :func:`make_scheduler` (linear warm-up then
  cosine, per step), :class:`EarlyStopping` (the one early-stopping and best-epoch rule);
- the steps: :func:`train_one_epoch` and :func:`evaluate_heads`, generic over the model's
  heads and the loss;
- :func:`run_epochs`, the epoch loop: train, validate, keep the best, stop early;
- history: one CSV row per epoch (:func:`write_history`).

A stage supplies its model, loss, metric and what to do with each epoch's row (save a
checkpoint, write its history); :mod:`faceattrs.training.run` (multitask) and
:mod:`faceattrs.age.finetune` (age heads) both run :func:`run_epochs`.

Data lives on the training device as a dict of tensors with a common first dimension
(``{"image": uint8 (N, 48, 48), "gender": long (N,), ...}``). A batch is gathered with
``index_select`` from an index tensor, turned into the model input by ``prepare(batch)``
(augmentation in training; the network normalises uint8 faces in evaluation) and scored by
``loss_fn(outputs, batch)``. There is no per-sample Python work anywhere in the loop.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..io import write_text_atomic
from ..metrics import scores_from_confusion
from .ddp import all_reduce_sum

Batch = dict[str, torch.Tensor]
# loss_fn(outputs, batch) -> loss, or (loss, {"part": scalar tensor}) to log the parts
LossFn = Callable[[dict[str, torch.Tensor], Batch], "torch.Tensor | tuple[torch.Tensor, dict]"]

# --------------------------------------------------------------------------- sampling


def sampler_weights(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per-sample weight = 1 / count of its class (each class gets equal total mass).

    >>> sampler_weights([0, 0, 0, 1]).tolist()
    [0.3333333432674408, 0.3333333432674408, 0.3333333432674408, 1.0]
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    counts = torch.bincount(labels).float()
    return 1.0 / counts[labels]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (seed, epoch, rank, stream)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def epoch_order(
    weights: torch.Tensor | None, n: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """This rank's sample indices for ``epoch`` (CPU long tensor).

    With ``weights``: ``n`` draws with replacement (``torch.multinomial``); without:
    a permutation. Every rank draws the same global sequence from ``(seed, epoch)`` and
    keeps its own contiguous share of ``n // world`` (equal shares keep DDP in step).
    """
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 1))
    if weights is None:
        order = torch.randperm(n, generator=g)
    else:
        order = torch.multinomial(weights.double(), n, replacement=True, generator=g)
    share = n // world
    return order[rank * share : (rank + 1) * share]


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed torch's global generators (augmentation, dropout) from (seed, epoch, rank)."""
    torch.manual_seed(mix_seed(seed, epoch, rank, 2))


# --------------------------------------------------------------------------- optimisation


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine down to ``min_ratio``.

    >>> [round(lr_factor(s, 2, 6), 3) for s in range(7)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min((step - warmup_steps) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR following :func:`lr_factor` (call ``step()`` after each batch)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, min_ratio)
    )


class EarlyStopping:
    """Stop after ``patience`` epochs without improvement of ``monitor``.

    >>> es = EarlyStopping("score", mode="max", patience=2)
    >>> [es.step(v) for v in (0.5, 0.6, 0.6, 0.55)], es.should_stop, es.best_epoch
    ([True, True, False, False], True, 2)
    """

    def __init__(self, monitor: str, mode: str = "max", patience: int = 8, min_delta: float = 0.0):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.epoch = 0

    def improves(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best):
            return not math.isnan(value)
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def step(self, value: float, epoch: int | None = None) -> bool:
        """Record one epoch's value; True when it is a new best."""
        self.epoch = epoch if epoch is not None else self.epoch + 1
        if self.improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, self.epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        keys = (
            "monitor",
            "mode",
            "patience",
            "min_delta",
            "best",
            "best_epoch",
            "bad_epochs",
            "epoch",
        )
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# --------------------------------------------------------------------------- the steps


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16`` is true, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def gather(data: Mapping[str, torch.Tensor], idx: torch.Tensor) -> Batch:
    """Rows ``idx`` of every tensor in ``data`` (one ``index_select`` each)."""
    return {k: v.index_select(0, idx) for k, v in data.items()}


def train_one_epoch(
    model: torch.nn.Module,
    loss_fn: LossFn,
    data: Mapping[str, torch.Tensor],
    order: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    prepare: Callable[[Batch], torch.Tensor],
    *,
    batch_size: int,
    scheduler=None,
    bf16: bool = False,
    channels_last: bool = False,
    max_batches: int = 0,
    progress: bool | str = True,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over ``order`` (this rank's sample indices into ``data``, on its device).

    Per batch: gather, ``prepare`` (augment), forward under optional bf16 autocast,
    ``loss_fn``, backward, optimiser step, ``after_step()`` (e.g. a weight average), then
    ``scheduler.step()`` (per-step schedule).
    The last, smaller batch is kept. ``max_batches`` > 0 stops early (smoke tests).
    Returns ``{"loss", "loss_<part>"..., "images", "seconds", "images_per_s"}``, losses
    averaged over images and over ranks.
    """
    model.train()
    device = order.device
    n_batches = math.ceil(len(order) / batch_size)
    if max_batches > 0:
        n_batches = min(n_batches, max_batches)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    bar = tqdm(
        total=n_batches * batch_size if max_batches else len(order),
        desc=progress if isinstance(progress, str) else "train",
        unit="img",
        disable=not progress or not sys.stderr.isatty(),
        leave=False,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    for b in range(n_batches):
        batch = gather(data, order[b * batch_size : (b + 1) * batch_size])
        x = prepare(batch)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
            outputs = model(x)
        result = loss_fn({k: v.float() for k, v in outputs.items()}, batch)
        loss, parts = result if isinstance(result, tuple) else (result, {})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        if scheduler is not None:
            scheduler.step()
        k = len(x)
        seen += k
        for name, v in {"loss": loss, **{f"loss_{p}": t for p, t in parts.items()}}.items():
            sums[name] = sums.get(name, 0.0) + v.detach().float() * k
        if bar.disable is False and (b % 5 == 0 or b == n_batches - 1):
            rate = seen / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
        bar.update(k)
    bar.close()
    seconds = time.perf_counter() - start
    names = sorted(sums)
    totals = torch.stack([sums[n] for n in names] + [torch.tensor(float(seen), device=device)])
    totals = all_reduce_sum(totals.to(device)).cpu()
    images = int(totals[-1].item())
    out = {n: float(totals[i] / max(images, 1)) for i, n in enumerate(names)}
    return {**out, "images": images, "seconds": seconds, "images_per_s": images / seconds}


def confusion(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """``(K, K)`` counts, rows = true class, columns = predicted class."""
    return torch.bincount(target.long() * k + pred.long(), minlength=k * k).reshape(k, k)


@torch.no_grad()
def evaluate_heads(
    model: torch.nn.Module,
    data: Mapping[str, torch.Tensor],
    heads: Mapping[str, int],
    *,
    batch_size: int = 512,
    loss_fn: LossFn | None = None,
    bf16: bool = False,
    channels_last: bool = False,
    indices: torch.Tensor | None = None,
    years: str | None = None,
) -> dict:
    """Accuracy, macro-F1 and confusion matrix per classification head; no augmentation.

    ``data`` holds ``"image"`` (uint8) and one long label tensor per name in ``heads``
    (name -> number of classes). ``indices`` restricts to this rank's share; confusion
    matrices and loss sums are added over ranks, so the figures are those of the whole
    set. Returns ``{head: {"accuracy", "macro_f1", "confusion"}, "loss": float | None,
    "images": int}``. ``years``: the name of a head of logits over whole years 0..Y-1
    (the age head), whose label is the age; adds ``{years: {"mae", "cs5"}}`` of the median
    of its softmax (the age point `faceattrs calibrate` usually picks), unclipped.
    """
    model.eval()
    device = data["image"].device
    if indices is None:
        indices = torch.arange(len(data["image"]), device=device)
    cms = {h: torch.zeros(k, k, dtype=torch.long, device=device) for h, k in heads.items()}
    loss_sum = torch.zeros((), device=device)
    age_sums = torch.zeros(2, device=device)  # |median - age| and count within 5 years
    for start in range(0, len(indices), batch_size):
        batch = gather(data, indices[start : start + batch_size])
        x = batch["image"]  # uint8: the network normalises (and lays out) its input
        with autocast(device, bf16):
            outputs = model(x)
        outputs = {k: v.float() for k, v in outputs.items()}
        if loss_fn is not None:
            result = loss_fn(outputs, batch)
            loss = result[0] if isinstance(result, tuple) else result
            loss_sum += loss * len(x)
        for h, k in heads.items():
            cms[h] += confusion(outputs[h].argmax(1), batch[h], k)
        if years is not None:
            cdf = outputs[years].softmax(1).cumsum(1)
            err = ((cdf < 0.5 - 1e-6).sum(1).float() - batch[years].float()).abs()
            age_sums += torch.stack([err.sum(), (err <= 5).sum().float()])
    count = torch.tensor(float(len(indices)), device=device)
    # float32 holds counts exactly up to 2**24; sums over ranks in one all-reduce
    parts = [loss_sum.reshape(1), count.reshape(1)] + [c.flatten().float() for c in cms.values()]
    parts.append(age_sums)
    packed = all_reduce_sum(torch.cat(parts))
    loss_total, n = float(packed[0]), int(packed[1].item())
    out: dict = {"images": n, "loss": loss_total / max(n, 1) if loss_fn is not None else None}
    offset = 2
    for h, k in heads.items():
        cm = packed[offset : offset + k * k].round().long().reshape(k, k).cpu().numpy()
        offset += k * k
        out[h] = {**scores_from_confusion(cm), "confusion": cm.tolist()}
    if years is not None:
        err_sum, within = packed[offset : offset + 2].tolist()
        out[years] = {"mae": err_sum / max(n, 1), "cs5": within / max(n, 1)}
    return out


# --------------------------------------------------------------------------- the loop


def run_epochs(
    epochs: Iterable[int],
    epoch_fn: Callable[[int], dict[str, Any]],
    stopper: EarlyStopping,
    on_epoch: Callable[[dict[str, Any], bool], None] | None = None,
) -> bool:
    """For each epoch: ``row = epoch_fn(epoch)`` (train one epoch and validate; the row
    holds ``stopper.monitor``), ``improved = stopper.step(row[monitor], epoch)``, then
    ``on_epoch(row, improved)`` (keep the best weights, write the history). Stops when
    ``stopper.should_stop``; returns True when it stopped before the last epoch.

    >>> es = EarlyStopping("score", "max", patience=1)
    >>> seen = []
    >>> run_epochs(range(1, 6), lambda e: {"score": [0.5, 0.7, 0.6, 0.9, 1][e - 1]}, es,
    ...            lambda row, best: seen.append((row["score"], best)))
    True
    >>> seen, es.best_epoch
    ([(0.5, True), (0.7, True), (0.6, False)], 2)
    """
    epochs = list(epochs)
    for epoch in epochs:
        if stopper.should_stop:  # e.g. a resumed run that had already stopped
            return True
        row = epoch_fn(epoch)
        improved = stopper.step(float(row[stopper.monitor]), epoch)
        if on_epoch is not None:
            on_epoch(row, improved)
        if stopper.should_stop and epoch < epochs[-1]:
            return True
    return False


# --------------------------------------------------------------------------- history


def write_history(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    """``history.csv``-style file: a header of ``fields``, then one line per epoch."""
    lines = [",".join(fields)]
    for r in rows:
        lines.append(",".join(_fmt(r.get(k, "")) for k in fields))
    write_text_atomic(path, "\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
