"""Validation scores of runs, each with flip TTA, and of their ensemble (never test).

    python scripts/val_ensemble.py --data local/prepared runs/long runs/w50

Per run: the best checkpoint's softmax probabilities of the face and its mirror image,
averaged; the ensemble averages those over runs. Prints gender / ethnicity accuracy,
macro-F1 and their mean (the training score) for each run and for the ensemble. Used to
choose distillation teachers (``faceattrs train ... teachers=RUN,RUN``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> int:
    from sklearn.metrics import f1_score

    from faceattrs.checkpoint import load_model
    from faceattrs.engine import predict
    from faceattrs.prepare import load_faces

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder written by faceattrs prepare")
    ap.add_argument("runs", nargs="+", help="training run folders")
    args = ap.parse_args()
    val = load_faces(args.data).subset("val")
    mirror = np.ascontiguousarray(val.images[:, :, ::-1])
    probs = {}
    for run in args.runs:
        model, _ = load_model(run, "best", "cpu")
        a, b = predict(model, val.images, 512), predict(model, mirror, 512)
        probs[run] = {
            h: (torch.from_numpy(a[h]).softmax(1) + torch.from_numpy(b[h]).softmax(1)).numpy() / 2
            for h in ("gender", "ethnicity")
        }

    def report(members: list[dict], name: str) -> None:
        out = []
        for head, y in (("gender", val.gender), ("ethnicity", val.ethnicity)):
            pred = sum(m[head] for m in members).argmax(1)
            out += [float((pred == y).mean()), float(f1_score(y, pred, average="macro"))]
        print(
            f"{name}: gender acc {out[0]:.4f} F1 {out[1]:.4f} | ethnicity acc {out[2]:.4f} "
            f"F1 {out[3]:.4f} | score {(out[1] + out[3]) / 2:.4f}"
        )

    for run, p in probs.items():
        report([p], run)
    if len(probs) > 1:
        report(list(probs.values()), "ensemble")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
