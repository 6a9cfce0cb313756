"""Would per-class logit offsets raise ethnicity macro-F1 (or age-bin accuracy)? Validation only.

A decision rule tuned for macro-F1 adds an offset to each class's logit before the
argmax (the "Other" class is rare and often missed). Tuned on the whole validation split,
it scores itself optimistically, so this script also tunes it on four fifths of the
split and scores the fifth left out (5-fold cross-validation, several shuffles): only a
gain that survives that is worth shipping. It also tries the logit adjustment
``logit - tau * log(prior)``. Input: ``predictions.npz`` from
``faceattrs evaluate --split val`` (logits and labels), or with ``--age`` its
``age/age_predictions_val.npz`` (the age head's six bin probabilities, their logarithm
taken as logits; the metric is then accuracy).

Run: ``faceattrs evaluate --data local/prepared --split val --out local/eval_val;
python scripts/val_class_offsets.py local/eval_val/predictions.npz;
python scripts/val_class_offsets.py --age local/eval_val/age/age_predictions_val.npz``

With ``--gender-by-group`` it tries one gender offset per *predicted* ethnicity instead
(each group's offset the one that maximises that group's gender accuracy; ties go to the
smallest), to see whether group-wise thresholds narrow the largest gender-accuracy gap
across (true) ethnicities without costing accuracy; scored the same two ways.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold

GRID = np.round(np.arange(-1.0, 2.01, 0.1), 2)
GRID_GROUP = np.round(np.arange(-1.5, 1.51, 0.05), 2)


def macro_f1(y, logits, offsets) -> float:
    return float(f1_score(y, (logits + offsets).argmax(1), average="macro"))


def accuracy(y, logits, offsets) -> float:
    return float(accuracy_score(y, (logits + offsets).argmax(1)))


def fit_offsets(logits: np.ndarray, y: np.ndarray, rounds: int = 3, metric=macro_f1):
    """Coordinate ascent on ``metric`` over :data:`GRID`, class 0 fixed at 0."""
    best_b = np.zeros(logits.shape[1])
    best = metric(y, logits, best_b)
    for _ in range(rounds):
        for k in range(1, logits.shape[1]):
            for v in GRID:
                b = best_b.copy()
                b[k] = v
                s = metric(y, logits, b)
                if s > best + 1e-9:
                    best, best_b = s, b
    return best_b


def fit_group_offsets(margin: np.ndarray, y: np.ndarray, group: np.ndarray, k: int):
    """Per group: the offset on the gender margin (logit 1 - logit 0) with the best
    accuracy in that group, the smallest in size among ties (0 for an empty group)."""
    out = np.zeros(k)
    for g in range(k):
        s = group == g
        if s.any():
            acc = np.array([((margin[s] + v > 0) == y[s]).mean() for v in GRID_GROUP])
            ties = GRID_GROUP[acc >= acc.max() - 1e-12]
            out[g] = ties[np.abs(ties).argmin()]
    return out


def group_report(pred, y, eth, k) -> dict:
    accs = [float((pred[eth == g] == y[eth == g]).mean()) for g in range(k)]
    return {
        "accuracy": round(float((pred == y).mean()), 4),
        "per_ethnicity": [round(a, 4) for a in accs],
        "largest_gap": round(max(accs) - min(accs), 4),
    }


def gender_by_group(d, shuffles: int) -> dict:
    logits = d["gender_logits"].astype(np.float64)
    margin, y = logits[:, 1] - logits[:, 0], d["gender_true"]
    eth, k = d["ethnicity_true"], d["ethnicity_logits"].shape[1]
    group = d["ethnicity_logits"].argmax(1)  # what a deployed rule can see
    out = {"n": len(y), "plain": group_report((margin > 0).astype(int), y, eth, k)}
    b = fit_group_offsets(margin, y, group, k)
    out["in_sample"] = {"offsets": b.round(2).tolist()}
    out["in_sample"].update(group_report((margin + b[group] > 0).astype(int), y, eth, k))
    out["cross_validated"] = []
    for seed in range(shuffles):
        pred = np.empty_like(y)
        folds = StratifiedKFold(5, shuffle=True, random_state=seed).split(margin, eth * 2 + y)
        for tr, te in folds:
            b = fit_group_offsets(margin[tr], y[tr], group[tr], k)
            pred[te] = (margin[te] + b[group[te]] > 0).astype(int)
        out["cross_validated"].append(group_report(pred, y, eth, k))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions", help="predictions.npz of faceattrs evaluate --split val")
    ap.add_argument("--head", default="ethnicity")
    ap.add_argument("--shuffles", type=int, default=3)
    ap.add_argument("--age", action="store_true", help="age bins (accuracy), see above")
    ap.add_argument("--gender-by-group", action="store_true", help="see above")
    args = ap.parse_args()
    d = np.load(args.predictions)
    if args.gender_by_group:
        print(json.dumps(gender_by_group(d, args.shuffles), indent=1))
        return
    if args.age:
        probs = d["direct_bin_probabilities"].astype(np.float64)
        logits, y, metric = np.log(np.clip(probs, 1e-9, 1.0)), d["true_bin"], accuracy
    else:
        logits, y = d[f"{args.head}_logits"].astype(np.float64), d[f"{args.head}_true"]
        metric = macro_f1
    zero = np.zeros(logits.shape[1])
    out = {"n": len(y), "plain": {"macro_f1": round(macro_f1(y, logits, zero), 4),
                                  "accuracy": round(accuracy(y, logits, zero), 4)}}  # fmt: skip
    b = fit_offsets(logits, y, metric=metric)
    out["in_sample"] = {
        "offsets": b.round(2).tolist(),
        "macro_f1": round(macro_f1(y, logits, b), 4),
        "accuracy": round(accuracy(y, logits, b), 4),
    }
    prior = np.bincount(y, minlength=logits.shape[1]) / len(y)
    out["logit_adjustment"] = {}
    for tau in (0.25, 0.5, 0.75, 1.0):
        pred = (logits - tau * np.log(prior)).argmax(1)
        out["logit_adjustment"][str(tau)] = {
            "macro_f1": round(float(f1_score(y, pred, average="macro")), 4),
            "accuracy": round(float(accuracy_score(y, pred)), 4),
        }
    out["cross_validated"] = []
    for seed in range(args.shuffles):
        pred = np.empty_like(y)
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(logits, y):
            pred[te] = (logits[te] + fit_offsets(logits[tr], y[tr], metric=metric)).argmax(1)
        out["cross_validated"].append(
            {
                "macro_f1": round(float(f1_score(y, pred, average="macro")), 4),
                "accuracy": round(float(accuracy_score(y, pred)), 4),
            }
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
