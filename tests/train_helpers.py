"""Helpers of the training tests (tests/test_train*.py): tiny settings and the history
reader."""

from __future__ import annotations

import csv
from pathlib import Path

from faceattrs import training as T

# one thread: tiny tensors gain nothing from two, and two OpenMP threads crawl when other
# processes share the cores
TINY = {"width": 0.125, "batch_size": 16, "epochs": 3, "warmup_epochs": 1.0, "device": "cpu",
        "eval_batch_size": 64, "threads": 1}  # fmt: skip


def tiny_cfg(**kw) -> T.TrainConfig:
    return T.resolve_config("paper", {**TINY, **kw})


def read_history(path: Path) -> list[dict[str, str]]:
    """The rows of a run's ``history.csv``, as strings."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
