"""Figures of the age stage. Each reads saved results (the ``age_predictions_<split>.npz``
arrays and the metrics dict of ``faceattrs.age.evaluate``) and writes one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from . import evaluate as evalplots
from .common import save

FILES = {
    "scatter": "age_scatter.png",
    "by_bin": "age_mae_by_bin.png",
    "by_group": "age_mae_by_group.png",
    "confusion": "age_bin_confusion.png",
    "grid": "age_grid.png",
}


def plot_all(npz: str | Path, metrics: dict, out_dir: str | Path) -> list[Path]:
    """Every age figure into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    with np.load(npz) as f:
        d = {k: f[k] for k in f.files}
    labels = metrics["bin_labels"]
    return [
        scatter(d, metrics, out_dir / FILES["scatter"]),
        mae_by_bin(metrics, out_dir / FILES["by_bin"]),
        mae_by_group(metrics, out_dir / FILES["by_group"]),
        evalplots.confusion(
            metrics["bin_report"]["confusion"], labels, out_dir / FILES["confusion"], "Age bin"
        ),
        grid(d, metrics, out_dir / FILES["grid"]),
    ]


def scatter(d: dict, metrics: dict, path: Path) -> Path:
    """Predicted vs true age: the two-stage model (default routing) and the direct head."""
    panels = []
    if metrics["routing"]:
        panels.append(
            (f"two-stage, {metrics['routing']} routing", d[metrics["routing"]], metrics["mae"])
        )
    if "direct" in d:
        panels.append(("direct head", d["direct"], metrics["direct"]["mae"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2), squeeze=False)
    top = max(100.0, float(d["age"].max()))
    for ax, (name, pred, m) in zip(axes[0], panels, strict=True):
        ax.scatter(d["age"], pred, s=4, alpha=0.35, c=d["true_bin"], cmap="viridis")
        ax.plot([0, top], [0, top], ls="--", c="grey", lw=1)
        for e in d["edges"]:
            ax.axvline(e, c="#cccccc", lw=0.6)
        ax.set(
            xlim=(0, top),
            ylim=(0, top),
            xlabel="true age",
            ylabel="predicted age",
            title=f"{name}: MAE {m:.2f}",
        )
    fig.suptitle(f"Age, {metrics['split']} split (n={metrics['n']})", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def mae_by_bin(metrics: dict, path: Path) -> Path:
    """MAE per true bin for hard, soft and oracle routing and the direct head."""
    per_bin = metrics["mae_per_bin"]
    labels = list(per_bin)
    kinds = [k for k in ("hard", "soft", "oracle", "direct") if k in per_bin[labels[0]]]
    x = np.arange(len(labels))
    w = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2, 3.6))
    for i, kind in enumerate(kinds):
        ax.bar(
            x + (i - (len(kinds) - 1) / 2) * w, [per_bin[b][kind] for b in labels], w, label=kind
        )
    ax.set_xticks(x, [f"{b}\nn={per_bin[b]['n']}" for b in labels], fontsize=8)
    shown = [(k, metrics.get(f"mae_{k}")) for k in ("hard", "soft", "oracle_bins")]
    shown += [("direct", (metrics.get("direct") or {}).get("mae"))]
    figures = ", ".join(f"{k.replace('_bins', '')} {v:.2f}" for k, v in shown if v is not None)
    ax.set(
        xlabel="true age bin",
        ylabel="MAE (years)",
        title=f"Age MAE per bin ({metrics['split']}): {figures}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def mae_by_group(metrics: dict, path: Path) -> Path:
    """MAE per ethnicity and per gender, two-stage (default routing) beside the direct head."""
    models = [("two-stage", metrics)] if metrics["routing"] else []
    if metrics.get("direct"):
        models.append(("direct", metrics["direct"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [5, 2]})
    for ax, key in zip(axes, ("mae_per_ethnicity", "mae_per_gender"), strict=True):
        names = list(metrics[key]["groups"])
        x = np.arange(len(names))
        w = 0.8 / len(models)
        for i, (label, m) in enumerate(models):
            vals = [m[key]["groups"][g]["value"] for g in names]
            ax.bar(x + (i - (len(models) - 1) / 2) * w, vals, w, label=label)
        ax.set_xticks(x, [f"{g}\nn={metrics[key]['groups'][g]['n']}" for g in names], fontsize=8)
        ax.set(ylabel="MAE (years)", title=key.replace("mae_per_", "MAE per "))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def grid(d: dict, metrics: dict, path: Path) -> Path:
    """Test faces captioned as in the reference: true age and range, predicted range, age."""
    labels = metrics["bin_labels"]
    idx = d["grid_index"]
    two_stage = bool(metrics["routing"])
    probs = d["bin_probabilities" if two_stage else "direct_bin_probabilities"]
    pred_bin = probs[idx].argmax(1)
    value = d[metrics["routing"] if two_stage else "direct"][idx]
    captions = []
    for i, j in enumerate(idx):
        tb, pb = int(d["true_bin"][j]), int(pred_bin[i])
        lines = [
            (f"True Age: {d['age'][j]:.1f}", True),
            (f"True Range: {labels[tb]}", True),
            (f"Pred Range: {labels[pb]}", tb == pb),
            (f"Age: {value[i]:.1f}", abs(value[i] - d["age"][j]) <= 5),
        ]
        if "direct" in d and two_stage:
            lines.append((f"Direct: {d['direct'][j]:.1f}", abs(d["direct"][j] - d["age"][j]) <= 5))
        captions.append(lines)
    model = f"two-stage, {metrics['routing']} routing" if two_stage else "direct age head"
    title = f"Age on {metrics['split']} faces ({model}; red = wrong bin or more than 5 years off)"
    return evalplots.face_grid(d["grid_images"], captions, path, ncols=4, title=title)
