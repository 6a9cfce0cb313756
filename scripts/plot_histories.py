"""Validation curves of three-head runs side by side (``history.csv`` of
``scripts/trial_three_heads.py`` or ``faceattrs train``): score (mean macro-F1 of gender and
ethnicity), gender accuracy and age MAE per epoch, the best-score epoch marked. A column no
run has (``faceattrs train`` logged no age MAE per epoch before 2026-11-29) gets no panel.

    python scripts/plot_histories.py runs/three_heads_ema45 runs/th_seed1 \\
        --out docs/results/default/history.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("val_score", "score (mean macro-F1)"), ("val_gender_accuracy", "gender accuracy"),
          ("val_age_mae", "age MAE (years)")]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="folders holding history.csv")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    a = ap.parse_args(argv)
    histories = {}
    for run in a.runs:
        path = run / "history.csv"
        if not path.exists():
            raise SystemExit(f"plot_histories: {path} is missing")
        histories[run] = list(csv.DictReader(path.open()))
    panels = [(k, t) for k, t in PANELS if any(k in rows[0] for rows in histories.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    axes = axes[0]
    for run, rows in histories.items():
        epochs = [int(r["epoch"]) for r in rows]
        best = max(range(len(rows)), key=lambda i: float(rows[i]["val_score"]))
        for ax, (key, label) in zip(axes, panels, strict=True):
            if key not in rows[0]:
                continue
            ys = [float(r[key]) for r in rows]
            (line,) = ax.plot(epochs, ys, label=run.name, lw=1.2)
            ax.plot(epochs[best], ys[best], "o", color=line.get_color())
            ax.set(xlabel="epoch", title=label)
    axes[0].set_ylim(0.6, None)
    if len(panels) > 2:
        axes[2].set_ylim(None, 10)
    axes[0].legend(fontsize=8)
    fig.suptitle("validation per epoch (dot: the epoch kept, best score)", fontsize=10)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=90)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
