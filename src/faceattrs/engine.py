"""Training and evaluation steps, generic over the model's heads and the loss.

Data lives on the training device as a dict of tensors with a common first dimension
(``{"image": uint8 (N, 48, 48), "gender": long (N,), ...}``). A batch is gathered with
``index_select`` from an index tensor, turned into the model input by ``prepare(batch)``
(augmentation in training, :func:`normalise` in evaluation) and scored by
``loss_fn(outputs, batch)``. There is no per-sample Python work anywhere in the loop.

``train_one_epoch`` and ``evaluate_heads`` return plain dicts; ``predict`` (from
:mod:`faceattrs.model`, re-exported) runs a model over uint8 faces in batches.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from tqdm import tqdm

from .metrics import scores_from_confusion
from .model import predict  # noqa: F401  (re-exported: the one batched forward pass)

Batch = dict[str, torch.Tensor]
# loss_fn(outputs, batch) -> loss, or (loss, {"part": scalar tensor}) to log the parts
LossFn = Callable[[dict[str, torch.Tensor], Batch], "torch.Tensor | tuple[torch.Tensor, dict]"]


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16`` is true, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def gather(data: Mapping[str, torch.Tensor], idx: torch.Tensor) -> Batch:
    """Rows ``idx`` of every tensor in ``data`` (one ``index_select`` each)."""
    return {k: v.index_select(0, idx) for k, v in data.items()}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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
    totals = _all_reduce_sum(totals.to(device)).cpu()
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
    packed = _all_reduce_sum(torch.cat(parts))
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
