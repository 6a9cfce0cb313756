"""What a backend or precision costs: one model's metrics through PyTorch fp32 and through
ONNX exports (fp32 or ``faceattrs export --int8``), on one split, side by side.

    python tools/compare_backends.py --data local/prepared --split val \\
        --out docs/results/int8 src/faceattrs/assets/default_model_int8

``--model`` (default: the bundled model) runs through PyTorch in fp32; each EXPORT through
onnxruntime. For each it computes, with the functions ``faceattrs evaluate`` uses: gender
accuracy and AUC, ethnicity accuracy and macro-F1, the largest gender-accuracy gap across
ethnicities, age MAE, CS@5 and 6-bin accuracy (the age model's own bins); and how often
each export picks the same class as PyTorch. Prints a table, writes ``OUT/compare.json``.

``--rule FILE`` (JSON, ``bars``: ``{"measure": M, "max_drop": D}`` or ``{"measure": M,
"max_rise": R}``) judges every export against PyTorch: exit 1 when a bar is missed.
Exit 2 on bad input (one line). Choose on the validation split; ``--split test`` reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MEASURES = {  # name -> label; each a number in one backend's row
    "gender_accuracy": "gender accuracy",
    "gender_auc": "gender AUC",
    "ethnicity_accuracy": "ethnicity accuracy",
    "ethnicity_macro_f1": "ethnicity macro-F1",
    "gender_gap": "gender gap across ethnicities",
    "age_mae": "age MAE, years",
    "age_cs5": "age CS@5",
    "age_bin_accuracy": "6-bin accuracy",
}


class Bad(Exception):
    """Bad input: one line, exit 2."""


def outputs(backend, images: np.ndarray, batch: int = 256):
    """Logits per head and the age prediction of ``backend`` over ``images``, batched."""
    logits, ages = [], []
    for i in range(0, len(images), batch):
        lo, age = backend.outputs(images[i : i + batch])
        logits.append(lo)
        ages.append(age)
    out = {h: np.concatenate([b[h] for b in logits]) for h in logits[0]}
    age = None
    if ages[0] is not None:
        age = {k: np.concatenate([a[k] for a in ages]) for k in ("value", "bin")}
    return out, age


def measures(backend, faces) -> tuple[dict, dict]:
    """``(row of MEASURES, raw predictions)`` of one backend on ``faces``."""
    from faceattrs.age.bins import assign_bins
    from faceattrs.age.evaluate import regression_metrics
    from faceattrs.evaluate import fairness_report, head_metrics

    logits, age = outputs(backend, faces.images)
    names = backend.class_names
    row = {}
    g = head_metrics(faces.gender, logits["gender"], names["gender"], None)
    e = head_metrics(faces.ethnicity, logits["ethnicity"], names["ethnicity"], None)
    row.update(
        gender_accuracy=g["accuracy"],
        gender_auc=g["auc"],
        ethnicity_accuracy=e["accuracy"],
        ethnicity_macro_f1=e["macro_f1"],
    )
    pred = {h: logits[h].argmax(1) for h in ("gender", "ethnicity")}
    fair = fairness_report(faces, pred)
    row["gender_gap"] = fair["gender_accuracy"]["by_ethnicity"]["max_gap"]
    if age is not None:
        reg = regression_metrics(faces.age, age["value"])
        true_bin = assign_bins(faces.age, backend.bundle.age["edges"])
        row.update(
            age_mae=reg["mae"],
            age_cs5=reg["cs5"],
            age_bin_accuracy=round(float(np.mean(age["bin"] == true_bin)), 4),
        )
    raw = {**pred, "age": None, "bin": None}
    if age is not None:
        raw.update(age=age["value"], bin=age["bin"])
    return row, raw


def same(a: dict, b: dict) -> dict:
    """How often two backends agree, face by face."""
    out = {
        f"{h}_same_class": round(float(np.mean(a[h] == b[h])), 4) for h in ("gender", "ethnicity")
    }
    if a["age"] is not None and b["age"] is not None:
        out["age_bin_same"] = round(float(np.mean(a["bin"] == b["bin"])), 4)
        out["age_mean_abs_difference"] = round(float(np.mean(np.abs(a["age"] - b["age"]))), 3)
    return out


def judge(bars: list[dict], ref: dict, row: dict) -> list[dict]:
    """Each bar with the change from ``ref`` to ``row`` and whether it is met."""
    out = []
    for bar in bars:
        m = bar["measure"]
        if m not in MEASURES:
            raise Bad(f"rule: unknown measure {m!r}; use one of {', '.join(MEASURES)}")
        if (row.get(m) is None) or (ref.get(m) is None):
            raise Bad(f"rule: {m} was not measured (no age model?)")
        change = round(row[m] - ref[m], 4)
        if "max_drop" in bar:
            ok = -change <= bar["max_drop"]
        elif "max_rise" in bar:
            ok = change <= bar["max_rise"]
        else:
            raise Bad(f"rule: bar for {m} needs max_drop or max_rise")
        out.append({**bar, "reference": ref[m], "value": row[m], "change": change, "met": ok})
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def read_rule(path: Path | None) -> list[dict] | None:
    if path is None:
        return None
    try:
        rule = json.loads(path.read_text())
        bars = rule["bars"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Bad(f"--rule {path}: not a rule file ({type(e).__name__}: {e})") from None
    if not isinstance(bars, list) or not bars:
        raise Bad(f"--rule {path}: 'bars' must be a non-empty list")
    return bars


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+", type=Path, help="ONNX export folders")
    ap.add_argument("--model", help="the model through PyTorch fp32 (default: the bundled one)")
    ap.add_argument("--data", required=True, type=Path, help="prepared folder or CSV")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--out", type=Path, help="folder for compare.json")
    ap.add_argument("--rule", type=Path, help="bars each export must clear against PyTorch")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except Bad as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from faceattrs.backends import OnnxBackend, TorchBackend
    from faceattrs.exceptions import FaceattrsError
    from faceattrs.io import write_json_atomic
    from faceattrs.prepare import load_faces

    bars = read_rule(args.rule)
    if not args.data.exists():
        raise Bad(f"--data {args.data} does not exist")
    try:
        faces = load_faces(args.data).subset(args.split)
        backends = {"torch-fp32": TorchBackend(args.model)}
        for e in args.exports:
            backends[str(e)] = OnnxBackend(e)
    except FaceattrsError as e:
        raise Bad(str(e)) from None
    if len(faces) == 0:
        raise Bad(f"{args.data} has no {args.split!r} rows")
    rows, raw = {}, {}
    for name, b in backends.items():
        q = (getattr(b, "manifest", None) or {}).get("quantization", {}).get("precision")
        rows[name], raw[name] = measures(b, faces)
        rows[name]["precision"] = q or "fp32"
        if name != "torch-fp32":
            rows[name].update(same(raw["torch-fp32"], raw[name]))
    ref = rows["torch-fp32"]
    print(f"{args.split} split, {len(faces)} faces; model through PyTorch fp32 and each export")
    print(f"{'measure':38s}" + "".join(f"{Path(n).name[-24:]:>26s}" for n in rows))
    same_keys = sorted({k for r in rows.values() for k in r if "same" in k or "difference" in k})
    for m in [*MEASURES, *same_keys]:
        label = MEASURES.get(m, m.replace("_", " ") + " (as PyTorch)")
        print(f"{label:38s}" + "".join(f"{_fmt(r.get(m)):>26s}" for r in rows.values()))
    result = {"split": args.split, "n": len(faces), "backends": rows}
    verdict = 0
    if bars is not None:
        result["rule"] = str(args.rule)
        result["verdicts"] = {}
        for name, row in list(rows.items())[1:]:
            judged = judge(bars, ref, row)
            met = all(b["met"] for b in judged)
            result["verdicts"][name] = {"met": met, "bars": judged}
            verdict = verdict or (0 if met else 1)
            for b in judged:
                print(
                    f"{Path(name).name}: {b['measure']} {b['reference']} -> {b['value']} "
                    f"({b['change']:+.4f}) {'met' if b['met'] else 'MISSED'}"
                )
        print("every bar met" if verdict == 0 else "a bar missed")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / "compare.json", result)
        print(f"wrote {args.out / 'compare.json'}")
    return verdict


if __name__ == "__main__":
    sys.exit(main())
