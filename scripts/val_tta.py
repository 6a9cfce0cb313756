"""Does flip test-time augmentation help? Validation split only (never test).

    python scripts/val_tta.py --model runs/default --data local/prepared

Prints gender / ethnicity accuracy and macro-F1 on the validation split with plain
inference and with the mean of the logits of the face and its mirror image, and, when the
model has a two-stage age model, its soft-routed validation MAE plain and with the bin
logits and per-bin ages of face and mirror averaged (not used by prediction yet); appends
one JSON line per variant to ``--log`` (default docs/results/trials.jsonl). The multitask
figures are of the plain network, whatever the run's calibrated flip choice.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def age_row(age, val, name: str) -> dict:
    """Soft-routed two-stage age MAE on validation: plain, and face + mirror averaged."""
    from faceattrs.postprocess import route, softmax

    a = age.two_stage_outputs(val.images)
    b = age.two_stage_outputs(np.ascontiguousarray(val.images[:, :, ::-1]))

    def mae(logits, per_bin):
        value = np.clip(route(softmax(logits), per_bin, "soft"), *age.clip)
        return round(float(np.abs(value - val.age).mean()), 4)

    return {
        "trial": f"{name} flip-tta",
        "split": "val",
        "n": len(val),
        "age_val_mae_soft_plain": mae(*a),
        "age_val_mae_soft_flip": mae((a[0] + b[0]) / 2, (a[1] + b[1]) / 2),
        "cpu": platform.processor() or platform.machine(),
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }


def main() -> int:
    from sklearn.metrics import f1_score

    from faceattrs.checkpoint import load_model
    from faceattrs.engine import predict
    from faceattrs.prepare import load_faces

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--log", type=Path, default=Path("docs/results/trials.jsonl"))
    args = ap.parse_args()

    from faceattrs.bundle import resolve

    bundle = resolve(args.model)
    model, meta = load_model(bundle.checkpoint, "best", "cpu")  # plain: flip_tta off
    val = load_faces(args.data).subset("val")
    plain = predict(model, val.images, 512)
    flipped = predict(model, np.ascontiguousarray(val.images[:, :, ::-1]), 512)
    rows = []
    for name, logits in (
        ("plain", plain),
        ("flip-tta", {h: (plain[h] + flipped[h]) / 2 for h in ("gender", "ethnicity")}),
    ):
        row = {"trial": f"{Path(args.model).name} {name}", "split": "val", "n": len(val)}
        for head, y in (("gender", val.gender), ("ethnicity", val.ethnicity)):
            pred = logits[head].argmax(1)
            row[f"{head}_accuracy"] = round(float((pred == y).mean()), 4)
            row[f"{head}_macro_f1"] = round(float(f1_score(y, pred, average="macro")), 4)
        row["cpu"] = platform.processor() or platform.machine()
        row["time"] = time.strftime("%Y-%m-%d %H:%M")
        rows.append(row)
        print(json.dumps(row))
    age = bundle.load_age()
    if age is not None:
        rows.append(age_row(age, val, f"{Path(args.model).name} age"))
        print(json.dumps(rows[-1]))
    with open(args.log, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
