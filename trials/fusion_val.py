"""Trial (issue 35, item 2): fusion of two finished models on the validation split, from
their `faceattrs evaluate --split val` outputs only (no model is run here).

    python trials/fusion_val.py runs/dlib_cam2 runs/rgb96_s0 [--weights 0.5]

Each RUN needs RUN/eval_val/predictions.npz (logits per head), RUN/eval_val/age/
age_predictions_val.npz (the age point) and RUN/calibration.json (temperatures). Faces
are matched by name (both prepared folders come from the same chips, same split). Prints,
for each model alone and fused (a weighted mean of the calibrated probabilities; of the
age points): gender accuracy / macro-F1, ethnicity accuracy / macro-F1, the selection
score (mean of the two macro-F1) and the age MAE. Leaves the repo once its row is in
docs/results/trials.jsonl.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from faceattrs.postprocess import softmax


def load(run: Path) -> dict:
    p = np.load(run / "eval_val" / "predictions.npz")
    a = np.load(run / "eval_val" / "age" / "age_predictions_val.npz")
    temps = json.loads((run / "calibration.json").read_text()).get("temperatures", {})
    order = np.argsort(p["names"])
    out = {"names": p["names"][order], "age_true": a["age"][order], "age": a["direct"][order]}
    for h in ("gender", "ethnicity"):
        out[h] = softmax(p[f"{h}_logits"][order], temps.get(h, 1.0))
        out[h + "_true"] = p[f"{h}_true"][order]
    return out


def scores(m: dict) -> dict:
    r = {}
    for h in ("gender", "ethnicity"):
        pred = m[h].argmax(1)
        r[h + "_acc"] = round(float((pred == m[h + "_true"]).mean()), 4)
        r[h + "_f1"] = round(float(f1_score(m[h + "_true"], pred, average="macro")), 4)
    r["score"] = round((r["gender_f1"] + r["ethnicity_f1"]) / 2, 4)
    r["age_mae"] = round(float(np.abs(m["age"] - m["age_true"]).mean()), 3)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--weights", default="0.25,0.5,0.75", help="weights of A in the fusion")
    args = ap.parse_args()
    a, b = load(args.a), load(args.b)
    if not np.array_equal(a["names"], b["names"]):
        raise SystemExit("the two evaluations hold different faces")
    print(args.a, scores(a))
    print(args.b, scores(b))
    for w in (float(x) for x in args.weights.split(",")):
        f = {k: a[k] for k in a}
        for h in ("gender", "ethnicity", "age"):
            f[h] = w * a[h] + (1 - w) * b[h]
        print(f"fused, weight of {args.a} {w}", scores(f))


if __name__ == "__main__":
    main()
