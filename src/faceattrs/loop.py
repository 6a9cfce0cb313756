"""The training loop and its parts, shared by every training stage (multitask and age).

- devices: :func:`select_device`, :func:`use_bf16`;
- sampling and seeding: :func:`sampler_weights`, :func:`epoch_order`, :func:`seed_epoch`
  (everything random derives from ``(seed, epoch, rank)``, so a resumed run equals an
  uninterrupted one);
- optimisation: :func:`make_optimizer` (AdamW), :func:`make_scheduler` (linear warm-up then
  cosine, per step), :class:`EarlyStopping` (the one early-stopping and best-epoch rule);
- :func:`run_epochs`, the epoch loop: train, validate, keep the best, stop early;
- history: one CSV row per epoch (:func:`write_history`, :func:`read_history`).

A stage supplies its model, loss, metric and what to do with each epoch's row (save a
checkpoint, write its history); ``faceattrs.train`` (multitask) and
``faceattrs.age.finetune`` (age heads) both run :func:`run_epochs`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError
from .io import write_text_atomic

# --------------------------------------------------------------------------- devices


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then CPU (under torchrun: this process's local GPU)."""
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


def use_bf16(setting: str, device: torch.device) -> bool:
    """Resolve ``bf16`` = auto / on / off for ``device``.

    auto: on for CUDA with bf16 support and for CPUs with native bf16 (AVX512-BF16/AMX);
    off elsewhere: on AVX2-only CPUs bf16 is emulated (measured ~10x slower on one).
    """
    s = str(setting).lower()
    if s in ("on", "true", "1", "yes"):
        return True
    if s in ("off", "false", "0", "no"):
        return False
    if s != "auto":
        raise ConfigError(f"bf16 must be auto, on or off, not {setting!r}")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


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


def read_history(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


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
