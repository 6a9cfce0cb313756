"""Figures of the data stage: label distributions per split, example duplicate pairs."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..labels import ETHNICITIES, GENDERS, SPLITS
from .common import save


def label_distribution(faces, path: str | Path) -> Path:
    """Age histogram per split, gender and ethnicity counts per split."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    bins = np.arange(0, 121, 4)
    for i, s in enumerate(SPLITS):
        m = faces.split == i
        axes[0].hist(
            faces.age[m], bins=bins, histtype="step", density=True, label=f"{s} ({m.sum()})"
        )
    axes[0].set(title="Age (density)", xlabel="years")
    axes[0].legend()
    for ax, values, names, title in (
        (axes[1], faces.gender, GENDERS, "Gender"),
        (axes[2], faces.ethnicity, ETHNICITIES, "Ethnicity"),
    ):
        x = np.arange(len(names))
        width = 0.8 / len(SPLITS)
        for i, s in enumerate(SPLITS):
            counts = np.bincount(values[faces.split == i], minlength=len(names))
            ax.bar(x + i * width, counts, width, label=s)
        ax.set_xticks(x + width, names)
        ax.set(title=f"{title} counts per split")
        ax.legend()
    return save(fig, path)


def duplicate_pairs(raw, dup, removed: np.ndarray, path: str | Path, n: int = 8) -> Path:
    """Removed rows beside the row kept in their place, with similarity and labels:
    the least similar near pairs first (the threshold's edge), then exact ones."""
    near = removed[dup.kind[removed] == "near"]
    near = near[np.argsort(dup.similarity[near])]
    exact = removed[dup.kind[removed] == "exact"]
    show = np.concatenate([near[: n - min(2, len(exact))], exact[:2]])[:n]
    cols = max(1, len(show))
    fig, axes = plt.subplots(2, cols, figsize=(2.0 * cols, 4.6), squeeze=False)
    for k, i in enumerate(show):
        r = dup.rep[i]
        for row, j in enumerate((r, i)):
            ax = axes[row, k]
            ax.imshow(raw.images[j], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            lab = f"{raw.age[j]}y {GENDERS[raw.gender[j]][0]} {ETHNICITIES[raw.ethnicity[j]]}"
            ax.set_title(
                ("kept" if row == 0 else f"{dup.kind[i]} {dup.similarity[i]:.3f}") + f"\n{lab}",
                fontsize=7,
            )
    if not len(show):
        axes[0, 0].text(0.5, 0.5, "no duplicates", ha="center")
    fig.suptitle("Duplicate pairs: kept (top) and removed (bottom)")
    return save(fig, path)
