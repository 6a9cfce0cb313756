"""Does flip test-time augmentation help? Validation split only (never test).

    python scripts/val_tta.py --model runs/default --data local/prepared

Prints gender / ethnicity accuracy and macro-F1 on the validation split with plain
inference and with the mean of the logits of the face and its mirror image, and appends
one JSON line per variant to ``--log`` (default docs/results/trials.jsonl).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


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

    model, meta = load_model(args.model, "best", "cpu")
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
    with open(args.log, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
