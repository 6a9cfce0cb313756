"""Judge a candidate model by a rule written down before its data (validation only, never test).

    python tools/check_rule.py --rule docs/results/rules/age-bin-seeds-2-3.json \\
        --data local/prepared --out local/cand/agebin23 RUN [RUN ...]

The rule file (JSON) names the incumbent and the bars the candidate must clear. The script
1. joins the runs into the candidate (``faceattrs ensemble``; a single run is copied),
2. calibrates it (``faceattrs calibrate``: flip-TTA choice, temperatures, age interval),
3. evaluates it and the incumbent on the validation split (``faceattrs evaluate --split
   val``; the test split is never read),
4. times one photo end to end (``FaceAnalyzer.analyze``, fp32) for both, interleaved, the
   median of ``--repeats`` calls each,
5. checks every bar, prints a table and writes ``OUT/verdict.json`` (each value, each bar,
   the verdict),
6. beside the verdict (never in it: the bars decide), the candidate-minus-incumbent
   difference of the score, gender accuracy, ethnicity macro-F1 and age MAE on the same
   faces, with its 95 % paired bootstrap interval (``differences``): a difference whose
   interval straddles 0 is within this split's noise.

Run it with nothing else busy on the CPU: the latency bar compares times. Checked on v5
itself as the candidate (twelfth session): its recorded validation figures come back
(score 0.8384, 6-bin accuracy 0.585, MAE 5.392, gender gap 0.073).

Exit status: 0 every bar met (the candidate may replace the incumbent), 1 a bar missed,
2 bad input. A bar is ``{"measure": M, "op": ">=" | "<=", "value": V}``; with
``"or_within_incumbent": R`` it is also met when the incumbent misses the same bar in the
same run and the candidate is within R times the incumbent (a latency bar on a slower CPU
than the one it was set on). Measures: see :data:`MEASURES`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "astronaut.jpg"

# measure -> (where in the validation metrics.json, label)
MEASURES = {
    "score": (None, "score (mean macro-F1, gender + eth.)"),
    "gender_accuracy": (("gender", "accuracy"), "gender accuracy"),
    "gender_auc": (("gender", "auc"), "gender AUC"),
    "ethnicity_accuracy": (("ethnicity", "accuracy"), "ethnicity accuracy"),
    "ethnicity_macro_f1": (("ethnicity", "macro_f1"), "ethnicity macro-F1"),
    "age_mae": (("age", "mae"), "age MAE, years"),
    "age_cs5": (("age", "cs5"), "age CS@5"),
    "age_bin_accuracy": (("age", "bin_accuracy"), "6-bin accuracy"),
    "gender_gap": (
        ("fairness", "gender_accuracy", "by_ethnicity", "max_gap"),
        "gender gap across ethnicities",
    ),
    "latency_ms": (None, "one photo end to end, fp32, ms"),
}
OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


class RuleError(Exception):
    """Bad input: one line, exit 2."""


def read_rule(path: Path) -> dict:
    try:
        rule = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RuleError(f"{path}: not a readable JSON rule ({e})") from None
    bars = rule.get("bars") if isinstance(rule, dict) else None
    if not isinstance(bars, list) or not bars:
        raise RuleError(f"{path}: needs a non-empty list 'bars'")
    for bar in bars:
        if not isinstance(bar, dict) or bar.get("measure") not in MEASURES:
            raise RuleError(f"{path}: bar {bar!r}: measure must be one of {', '.join(MEASURES)}")
        if bar.get("op") not in OPS or not isinstance(bar.get("value"), int | float):
            raise RuleError(f"{path}: bar {bar!r}: needs op '>=' or '<=' and a number 'value'")
    return rule


def cli(*argv: str) -> None:
    """One ``faceattrs`` command, in this process; a failure stops the check."""
    from faceattrs.cli import main

    status = main(list(argv))
    if status != 0:
        raise RuleError(f"faceattrs {' '.join(argv)}: exit {status}")


def measures(val_dir: Path, calibrated_here: Path | None = None) -> dict[str, float]:
    """The rule's measures (all but latency) from ``faceattrs evaluate --split val``'s files.

    The score is the mean macro-F1 of gender and ethnicity with the model's flip-TTA
    setting; for ``calibrated_here`` (a model just calibrated on these faces) it is the
    value its ``calibration.json`` recorded for that setting (unrounded F1s), else the
    same mean from the metrics (a model calibrated before, perhaps on other faces).
    """
    metrics = json.loads((val_dir / "metrics.json").read_text())
    out = {}
    for name, (keys, _) in MEASURES.items():
        if keys is None:
            continue
        value = metrics
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            out[name] = float(value)
    if calibrated_here is not None:
        calib = json.loads((calibrated_here / "calibration.json").read_text())
        choice = "flip" if calib.get("flip_tta") else "plain"
        out["score"] = float(calib["flip_tta_selection"]["val_score"][choice])
    else:
        f1 = [metrics[h]["macro_f1"] for h in ("gender", "ethnicity")]
        out["score"] = round(sum(f1) / len(f1), 4)
    return out


def latencies(models: dict[str, str | None], photo: Path, repeats: int) -> dict[str, float]:
    """Median ms of ``analyze(photo)`` per model, calls interleaved (the VM's speed drifts)."""
    from faceattrs.photo import load_image
    from faceattrs.predict import FaceAnalyzer

    image = load_image(photo)
    analyzers = {name: FaceAnalyzer(m) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(repeats + 5):  # the first 5 rounds warm up
        for name, a in analyzers.items():
            t = time.perf_counter()
            a.analyze(image)
            if i >= 5:
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def _mean_f1(yg, pg, ye, pe, axis=-1):
    from faceattrs.bootstrap import boot_macro_f1

    return (boot_macro_f1(yg, pg, axis=axis) + boot_macro_f1(ye, pe, axis=axis)) / 2


def _minus(stat):
    """``stat(y, a) - stat(y, b)``: a vectorised statistic of the candidate's predictions
    ``a`` minus the incumbent's ``b`` on the same faces."""
    return lambda y, a, b, axis=-1: stat(y, a, axis) - stat(y, b, axis)


def differences(cand_dir: Path, inc_dir: Path, resamples: int = 1000) -> dict[str, dict]:
    """Candidate minus incumbent on the same validation faces, each with its 95 % paired
    bootstrap interval (faces resampled with both models' predictions kept together):
    ``{measure: {"difference", "ci95"}}``, from the two ``evaluate --split val`` folders."""
    import numpy as np

    from faceattrs import bootstrap as M

    c, i = (np.load(d / "predictions.npz") for d in (cand_dir, inc_dir))
    if not np.array_equal(c["index"], i["index"]):
        raise RuleError(f"{cand_dir} and {inc_dir} hold different faces")
    yg, ye = c["gender_true"], c["ethnicity_true"]
    pc = {h: c[f"{h}_logits"].argmax(1) for h in ("gender", "ethnicity")}
    pi = {h: i[f"{h}_logits"].argmax(1) for h in ("gender", "ethnicity")}
    stats = {
        "score": (
            lambda yg, gc, gi, ye, ec, ei, axis=-1: (
                _mean_f1(yg, gc, ye, ec, axis) - _mean_f1(yg, gi, ye, ei, axis)
            ),
            (yg, pc["gender"], pi["gender"], ye, pc["ethnicity"], pi["ethnicity"]),
        ),
        "gender_accuracy": (_minus(M.boot_accuracy), (yg, pc["gender"], pi["gender"])),
        "ethnicity_macro_f1": (_minus(M.boot_macro_f1), (ye, pc["ethnicity"], pi["ethnicity"])),
    }
    ages = [_age_predictions(d) for d in (cand_dir, inc_dir)]
    if all(a is not None for a in ages):
        (age, ac), (_, ai) = ages
        stats["age_mae"] = (_minus(M.boot_mae), (age, ac, ai))
    out = {}
    for name, (stat, data) in stats.items():
        whole = float(stat(*(np.asarray(x)[None] for x in data))[0])
        ci = M.bootstrap_ci(stat, *data, resamples=resamples)
        out[name] = {"difference": round(whole, 4), "ci95": ci}
    return out


def _age_predictions(val_dir: Path):
    """``(true ages, the model's reported ages)`` of an evaluation, or None without an age
    model: the direct head's, or the routing's (as ``metrics.json["age"]`` says)."""
    import numpy as np

    path = val_dir / "age" / "age_predictions_val.npz"
    age = json.loads((val_dir / "metrics.json").read_text()).get("age")
    if not path.exists() or not isinstance(age, dict):
        return None
    z = np.load(path)
    key = "direct" if age.get("approach") == "direct" or "hard" not in z else age["routing"]
    return z["age"], z[key]


def judge(bars: list[dict], cand: dict, inc: dict) -> list[dict]:
    """Each bar with the candidate's and incumbent's values and whether it is met."""
    rows = []
    for bar in bars:
        m, op, v = bar["measure"], bar["op"], bar["value"]
        c, i = cand.get(m), inc.get(m)
        met = c is not None and OPS[op](c, v)
        how = "bar"
        r = bar.get("or_within_incumbent")
        if not met and r and c is not None and i is not None and not OPS[op](i, v):
            met = OPS[op](c, i * r if op == "<=" else i / r)
            how = f"within {r}x the incumbent, which misses the bar too"
        rows.append({**bar, "candidate": c, "incumbent": i, "met": met, "judged_by": how})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="the candidate's run folders (joined when several)")
    ap.add_argument("--rule", required=True, type=Path, help="the rule (JSON), written before")
    ap.add_argument("--data", required=True, help="prepared folder (faceattrs prepare)")
    ap.add_argument("--out", required=True, type=Path, help="new folder for the candidate")
    ap.add_argument("--incumbent", help="model to beat (default: the rule's, else the bundled)")
    ap.add_argument("--photo", type=Path, default=SAMPLE, help="photo timed end to end")
    ap.add_argument("--repeats", type=int, default=40, help="timed calls per model")
    ap.add_argument("--fp16", action="store_true", help="join in half precision, as shipped")
    args = ap.parse_args(argv)
    try:
        return check(args)
    except RuleError as e:
        print(f"check_rule: error: {e}", file=sys.stderr)
        return 2


def check(args) -> int:
    rule = read_rule(args.rule)
    if args.repeats < 1:
        raise RuleError(f"--repeats must be at least 1, got {args.repeats}")
    if not args.photo.is_file():
        raise RuleError(f"{args.photo}: no such photo")
    if args.out.exists():
        raise RuleError(f"{args.out} exists; choose a new --out folder (a check never reuses one)")
    for run in args.runs:
        if not Path(run).is_dir():
            raise RuleError(f"{run}: no such run folder")
    try:
        return judge_candidate(args, rule)
    except BaseException:  # nothing half-made stays (verdict.json, written last, marks done)
        shutil.rmtree(args.out, ignore_errors=True)
        raise


def judge_candidate(args, rule: dict) -> int:
    incumbent = args.incumbent or rule.get("incumbent", "default")
    inc_model = None if incumbent == "default" else incumbent
    model = args.out / "model"
    if len(args.runs) == 1:
        shutil.copytree(args.runs[0], model)
    else:
        cli("ensemble", *args.runs, "--out", str(model), *(["--fp16"] if args.fp16 else []))
    cli("calibrate", "--model", str(model), "--data", args.data)
    cli("evaluate", "--model", str(model), "--data", args.data, "--split", "val",
        "--out", str(args.out / "val"), "--grid", "0")  # fmt: skip
    inc_args = ["--model", inc_model] if inc_model else []
    cli("evaluate", *inc_args, "--data", args.data, "--split", "val",
        "--out", str(args.out / "incumbent_val"), "--grid", "0")  # fmt: skip
    cand = measures(args.out / "val", calibrated_here=model)
    inc = measures(args.out / "incumbent_val")
    if any(b["measure"] == "latency_ms" for b in rule["bars"]):
        lat = latencies({"candidate": str(model), "incumbent": inc_model}, args.photo,
                        args.repeats)  # fmt: skip
        cand["latency_ms"], inc["latency_ms"] = lat["candidate"], lat["incumbent"]
    rows = judge(rule["bars"], cand, inc)
    adopted = all(r["met"] for r in rows)
    print(f"rule: {rule.get('name', args.rule)} (written {rule.get('written', '?')})")
    w = max(len(label) for _, label in MEASURES.values())
    print(f"{'measure':<{w}} {'candidate':>10} {'incumbent':>10}   bar")

    def line(m: str) -> str:
        c, i = (f"{x:.4g}" if x is not None else "-" for x in (cand.get(m), inc.get(m)))
        return f"{MEASURES[m][1]:<{w}} {c:>10} {i:>10}"

    for r in rows:
        mark = "met" if r["met"] else "MISSED"
        extra = "" if r["judged_by"] == "bar" else f" ({r['judged_by']})"
        print(f"{line(r['measure'])}   {r['op']} {r['value']}: {mark}{extra}")
    for m in sorted(set(cand) - {r["measure"] for r in rows}):  # measured, not judged
        print(line(m))
    verdict = "adopt" if adopted else "not adopted"
    print(f"verdict: {verdict}")
    diffs = differences(args.out / "val", args.out / "incumbent_val")
    print("candidate - incumbent on the same faces (95 % paired bootstrap interval):")
    for name, d in diffs.items():
        ci = d["ci95"]
        span = "-" if ci is None else f"{ci[0]:+.4f} .. {ci[1]:+.4f}"
        print(f"  {MEASURES[name][1]:<{w}} {d['difference']:+.4f}  [{span}]")
    record = {
        "rule": str(args.rule), "rule_text": rule, "runs": [str(r) for r in args.runs],
        "candidate": str(model), "incumbent": incumbent, "split": "val",
        "measures": {"candidate": cand, "incumbent": inc}, "bars": rows, "verdict": verdict,
        "differences": diffs,
    }  # fmt: skip
    from faceattrs.io import write_json_atomic

    write_json_atomic(args.out / "verdict.json", record)
    return 0 if adopted else 1


if __name__ == "__main__":
    sys.exit(main())
