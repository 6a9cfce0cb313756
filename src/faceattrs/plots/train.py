"""Training curves from ``history.csv`` (one row per epoch, written by ``training.fit``)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.pyplot as plt

from .common import save


def plot_history(csv_path: str | Path, out_path: str | Path) -> Path:
    """Three panels: losses, validation accuracy and macro-F1 per task, learning rate; a
    fourth, the age head's validation MAE and CS@5, for a three-head run."""
    with Path(csv_path).open(newline="") as f:
        rows = list(csv.DictReader(f))

    def col(name):
        return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]

    ep = col("epoch")
    age = bool(rows) and "val_age_mae" in rows[0]
    fig, axes = plt.subplots(1, 4 if age else 3, figsize=(18.5 if age else 14, 4))
    ax = axes[0]
    ax.plot(ep, col("train_loss"), "o-", label="train (augmented)")
    ax.plot(ep, col("val_loss"), "o-", label="validation")
    ax.set(title="weighted loss", xlabel="epoch")
    ax.legend()
    ax = axes[1]
    tasks = [c[4 : -len("_macro_f1")] for c in (rows[0] if rows else {}) if c.startswith("val_")
             and c.endswith("_macro_f1")]  # fmt: skip
    for i, task in enumerate(tasks):  # every head in the history (gender, ethnicity, ...)
        colour = f"C{i}"
        ax.plot(ep, col(f"val_{task}_accuracy"), "--", color=colour, label=f"{task} accuracy")
        ax.plot(ep, col(f"val_{task}_macro_f1"), "o-", color=colour, label=f"{task} macro-F1")
    score = col("val_score")
    ax.plot(ep, score, "k-", lw=2, label="score (mean F1)")
    if rows:
        best = max(range(len(score)), key=lambda i: score[i])
        ax.axvline(ep[best], color="grey", ls=":", label=f"best epoch {ep[best]:.0f}")
    ax.set(title="validation", xlabel="epoch")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(ep, col("lr"), "o-")
    ax.set(title="learning rate (end of epoch)", xlabel="epoch")
    if age:
        ax = axes[3]
        ax.plot(ep, col("val_age_mae"), "o-", color="C3", label="MAE (years)")
        ax.set(title="age head, validation (median year)", xlabel="epoch", ylabel="MAE (years)")
        twin = ax.twinx()
        twin.plot(ep, col("val_age_cs5"), "--", color="C4", label="CS@5")
        twin.set(ylabel="CS@5 (share within 5 years)")
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return save(fig, out_path)
