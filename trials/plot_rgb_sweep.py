"""Draws docs/results/rgb-sweep/sweep.png from the histories and fairface_dev summaries
beside it (and v7's, docs/results/fairface-default/fairface.json). Run from the repo root:
python trials/plot_rgb_sweep.py"""

import csv
import json

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

D = "docs/results/rgb-sweep"
NAMES = {"rgb64": "64 px", "rgb96": "96 px", "rgb128": "128 px",
         "rgb64_dlibcrop": "64 px, dlib's chip"}  # fmt: skip

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
for k, lab in NAMES.items():
    rows = list(csv.DictReader(open(f"{D}/history_{k}.csv")))
    a.plot([int(r["epoch"]) for r in rows], [float(r["val_score"]) for r in rows],
           marker="o", ms=3, label=lab)  # fmt: skip
a.set_ylim(0.6, 0.84)
a.set_xlabel("epoch (15-epoch schedule)")
a.set_ylabel("validation score (mean macro-F1, gender + ethnicity)")
a.set_title("rgb preset from scratch: validation")
a.legend()
a.grid(alpha=0.3)

x, w = np.arange(len(NAMES)), 0.38
ff = [json.load(open(f"{D}/fairface_{k}.json"))["overall"] for k in NAMES]
v7 = json.load(open("docs/results/fairface-default/fairface.json"))["overall"]
g = [100 * f["gender_acc"] for f in ff]
ag = [100 * f["age_acc"] for f in ff]
b.bar(x - w / 2, g, w, label="gender")
b.bar(x + w / 2, ag, w, label="age group (9)")
b.axhline(100 * v7["gender_acc"], color="k", ls="--", lw=1,
          label=f"v7 gender ({100 * v7['gender_acc']:.1f})")  # fmt: skip
b.axhline(100 * v7["age_acc"], color="gray", ls=":", lw=1,
          label=f"v7 age group ({100 * v7['age_acc']:.1f})")  # fmt: skip
for i, (u, v) in enumerate(zip(g, ag, strict=True)):
    b.text(i - w / 2, u + 1, f"{u:.1f}", ha="center", fontsize=8)
    b.text(i + w / 2, v + 1, f"{v:.1f}", ha="center", fontsize=8)
b.set_xticks(x, list(NAMES.values()), fontsize=8)
b.set_ylim(0, 100)
b.set_ylabel("% of 270 photos")
b.set_title("fairface_dev (other cameras; ~4-point noise)")
b.legend(fontsize=7, loc="lower right")
fig.tight_layout()
fig.savefig(f"{D}/sweep.png", dpi=110)
print(f"-> {D}/sweep.png")
