"""Figures of the evaluation stages: confusion matrices, ROC, reliability diagrams, fairness
bars, captioned face grids, Grad-CAM grids, error-cluster montages and their PCA map.

Every function takes saved numbers / arrays (never a model) and writes one PNG.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..metrics import row_normalise
from .common import save

WRONG = "#d62728"  # mistakes are marked in red
RIGHT = "#222222"


def confusion(cm: Sequence[Sequence[int]], names: Sequence[str], path: Path, title: str) -> Path:
    """Counts (left) and row-normalised rates (right; recall on the diagonal)."""
    cm = np.asarray(cm)
    k = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(2.6 + 1.3 * k, 1.6 + 0.55 * k))
    for ax, data, fmt, sub in (
        (axes[0], cm, "{:d}", "counts"),
        (axes[1], row_normalise(cm), "{:.2f}", "row-normalised"),
    ):
        ax.imshow(data, cmap="Blues", vmin=0, vmax=max(data.max(), 1e-9))
        for i in range(k):
            for j in range(k):
                dark = data[i, j] > 0.6 * data.max()
                ax.text(
                    j,
                    i,
                    fmt.format(data[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(k), names, rotation=30, ha="right")
        ax.set_yticks(range(k), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: {sub}", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def roc(curve: dict, path: Path, title: str = "Gender ROC") -> Path:
    """``curve`` = :func:`faceattrs.metrics.binary_roc` output."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot(curve["fpr"], curve["tpr"], lw=2, label=f"AUC = {curve['auc']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right")
    return save(fig, path)


def reliability(before: dict, after: dict | None, path: Path, title: str, ece=None) -> Path:
    """Accuracy per confidence bin (bars) and its gap to the bin's mean confidence (hatched),
    before and, when given, after temperature scaling. Bins: metrics.reliability_bins."""
    panels = [("before", before)] + ([("after", after)] if after is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), squeeze=False)
    for i, (ax, (name, bins)) in enumerate(zip(axes[0], panels, strict=True)):
        edges = np.asarray(bins["edges"])
        full = [c is not None for c in bins["confidence"]]
        acc = np.array([a if ok else 0.0 for a, ok in zip(bins["accuracy"], full, strict=True)])
        conf = np.array([c if ok else 0.0 for c, ok in zip(bins["confidence"], full, strict=True)])
        kw = {"width": np.diff(edges), "align": "edge"}
        ax.bar(edges[:-1], acc, edgecolor="k", alpha=0.8, label="accuracy", **kw)
        ax.bar(
            edges[:-1],
            np.where(full, conf - acc, 0),
            bottom=acc,
            fill=False,
            ec=WRONG,
            hatch="//",
            lw=0.6,
            label="gap to mean confidence",
            **kw,
        )
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        label = f"{name} scaling" + (f", ECE {ece[i]:.3f}" if ece is not None else "")
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="confidence (max probability)",
            ylabel="accuracy",
            title=label,
        )
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def selective(sel: dict, path: Path) -> Path:
    """Accuracy against the share of faces answered (the most confident first), one line
    per head, the listed shares marked with their confidence threshold."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for i, (head, r) in enumerate(sel.items()):
        ax.plot(r["curve"]["coverage"], r["curve"]["accuracy"], c=f"C{i}", label=head)
        for a in r["at"]:
            ax.plot(a["coverage"], a["accuracy"], "o", c=f"C{i}", ms=3)
            ax.annotate(f"p>={a['threshold']:.2f}", (a["coverage"], a["accuracy"]),
                        textcoords="offset points", xytext=(2, 4), fontsize=6, c=f"C{i}")  # fmt: skip
    ax.set(xlim=(0, 1.02), xlabel="share of faces answered (most confident first)",
           ylabel="accuracy on the faces answered")  # fmt: skip
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("answering only confident faces (calibrated probabilities)", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def fairness(fair: dict, path: Path) -> Path:
    """Bars per group: one row per metric, one column per grouping; the largest gap in titles."""
    metrics = list(fair)
    groupings = list(fair[metrics[0]])
    fig, axes = plt.subplots(
        len(metrics),
        len(groupings),
        squeeze=False,
        figsize=(3.4 * len(groupings), 2.8 * len(metrics)),
    )
    for r, metric in enumerate(metrics):
        for c, grouping in enumerate(groupings):
            ax, res = axes[r, c], fair[metric][grouping]
            names = list(res["groups"])
            vals = [res["groups"][g]["value"] for g in names]
            small = [
                res["groups"][g]["n"] < res["min_size"] or v is None
                for g, v in zip(names, vals, strict=True)
            ]
            bars = ax.bar(
                names,
                [0.0 if v is None else v for v in vals],
                color=["#bbbbbb" if s else f"C{r}" for s in small],
            )
            for b, g, v in zip(bars, names, vals, strict=True):
                ax.text(
                    b.get_x() + b.get_width() / 2,
                    b.get_height(),
                    f"n={res['groups'][g]['n']}" + (" n/a" if v is None else ""),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
            gap = "n/a" if res["max_gap"] is None else f"{res['max_gap']:.3f}"
            by = grouping.removeprefix("by_").replace("_age_standardised", ", age-standardised")
            ax.set_title(
                f"{metric.replace('_', ' ')} by {by}\nlargest gap {gap}",
                fontsize=9,
            )
            ax.set_ylim(0, 1.1)
            ax.tick_params(axis="x", labelrotation=35, labelsize=7)
    min_size = fair[metrics[0]][groupings[0]]["min_size"]
    fig.suptitle(
        f"grey bars: groups under {min_size} faces, left out of the largest gap", fontsize=9
    )
    fig.subplots_adjust(wspace=0.25, hspace=0.75)  # fixed: tight_layout costs a second draw
    return save(fig, path)


def fairness_cross(cross: dict, path: Path, min_size: int) -> Path:
    """Heat maps, one per metric: ethnicity (rows) by age group (columns), each cell's value
    and face count; cells under ``min_size`` faces are hatched (too few to read much into)."""
    fig, axes = plt.subplots(1, len(cross), squeeze=False, figsize=(5.2 * len(cross), 3.6))
    for ax, (metric, t) in zip(axes[0], cross.items(), strict=True):
        vals = np.array([[np.nan if v is None else v for v in row] for row in t["value"]])
        n = np.array(t["n"])
        im = ax.imshow(vals, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
        for i in range(vals.shape[0]):
            for j in range(vals.shape[1]):
                text = "-" if n[i, j] == 0 else f"{vals[i, j]:.2f}\nn={n[i, j]}"
                dark = np.isnan(vals[i, j]) or vals[i, j] < 0.8
                ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                        color="white" if dark else "black")  # fmt: skip
                if 0 < n[i, j] < min_size:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                               edgecolor="#dddddd", linewidth=0))  # fmt: skip
        ax.set_xticks(range(len(t["cols"])), t["cols"], fontsize=7)
        ax.set_yticks(range(len(t["rows"])), t["rows"], fontsize=7)
        ax.set_xlabel("age group (years)", fontsize=8)
        ax.set_title(f"{metric.replace('_', ' ')} by ethnicity and age", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"hatched: cells under {min_size} faces; -: no face", fontsize=8)
    fig.subplots_adjust(wspace=0.35, top=0.82, bottom=0.15)
    return save(fig, path)


def face_grid(
    images: np.ndarray,
    captions: Sequence[Sequence[tuple[str, bool]]],
    path: Path,
    ncols: int = 6,
    title: str | None = None,
) -> Path:
    """Faces with caption lines ``(text, correct)``; wrong lines and frames in red."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    lines = max((len(c) for c in captions), default=1)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.7 * ncols, (2.5 + 0.22 * lines) * nrows + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, caption in zip(axes.flat, images, captions, strict=False):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ok = all(good for _, good in caption)
        for spine in ax.spines.values():
            spine.set_edgecolor(RIGHT if ok else WRONG)
            spine.set_linewidth(1 if ok else 3)
        for i, (text, good) in enumerate(caption):
            ax.text(
                0.5,
                -0.04 - 0.1 * i,
                text,
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=7,
                color=RIGHT if good else WRONG,
            )
    if title:
        fig.suptitle(title, fontsize=11)
    # room below each face for its caption lines (tight_layout ignores free text)
    fig.subplots_adjust(
        left=0.01, right=0.99, top=0.95, bottom=0.04, wspace=0.08, hspace=0.12 + 0.11 * lines
    )
    return save(fig, path)


def photo_boxes(image: np.ndarray, boxes: Sequence[Sequence[int]], path: Path) -> Path:
    """The photo with numbered face boxes ``(x, y, w, h)``."""
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(5, 5 * h / max(w, 1)))
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    for i, (x, y, bw, bh) in enumerate(boxes):
        ax.add_patch(plt.Rectangle((x, y), bw, bh, fill=False, ec="lime", lw=2))
        ax.text(x, y - 2, str(i), color="lime", fontsize=10, va="bottom")
    ax.axis("off")
    return save(fig, path)


def cluster_montage(clusters: Sequence[dict], path: Path, per_row: int = 10) -> Path:
    """One row of example faces per cluster, above it the cluster's measured description."""
    fig, axes = plt.subplots(
        len(clusters), per_row, figsize=(1.2 * per_row, 1.75 * len(clusters)), squeeze=False
    )
    for r, cl in enumerate(clusters):
        for c in range(per_row):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(cl["images"]):
                ax.imshow(cl["images"][c], cmap="gray", vmin=0, vmax=255)
        title = textwrap.fill(cl["title"], width=int(per_row * 14))
        axes[r, 0].text(
            0, 1.06, title, transform=axes[r, 0].transAxes, ha="left", va="bottom", fontsize=8
        )
    fig.subplots_adjust(left=0.01, right=0.99, wspace=0.05, hspace=0.55)
    return save(fig, path)


def pca_scatter(
    points: np.ndarray,
    cluster: np.ndarray,
    markers: np.ndarray,
    marker_names,
    path: Path,
    explained: Sequence[float],
) -> Path:
    """2-D PCA of error embeddings, coloured by cluster, one marker per true class."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    shapes = "osD^vP*X"
    for k in np.unique(cluster):
        for m in np.unique(markers):
            sel = (cluster == k) & (markers == m)
            if sel.any():
                ax.scatter(
                    points[sel, 0],
                    points[sel, 1],
                    s=14,
                    c=f"C{k}",
                    marker=shapes[m % 8],
                    alpha=0.7,
                    edgecolors="none",
                )
    for k in np.unique(cluster):
        ax.scatter([], [], c=f"C{k}", label=f"cluster {k}")
    for m in np.unique(markers):
        ax.scatter([], [], c="grey", marker=shapes[m % 8], label=f"true {marker_names[m]}")
    ax.set(
        xlabel=f"PC1 ({explained[0]:.0%} of variance)",
        ylabel=f"PC2 ({explained[1]:.0%})",
        title="Misclassified ethnicity embeddings (PCA)",
    )
    ax.legend(fontsize=7, loc="best")
    return save(fig, path)
