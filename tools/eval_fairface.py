"""The photo path on FairFace photos: found rate, gender and age-group accuracy per age
group and gender (docs/photos.md). For measuring only: never train or select on this set.

Each photo of ``fairface_dev`` (``ground_truth.json``: ``gender`` Male / Female, ``age``
one of FairFace's 9 groups) goes through ``faceattrs predict``'s path (decode, detect,
align, crop, models). The labelled face is the one whose box centre is nearest the photo's
centre. A photo where no face is found counts as wrong for gender and age. The predicted
age (years) is put into FairFace's groups (0-2, 3-9, 10-19, ..., 60-69, 70+: an age of
2.6 years is in 0-2, 2.99 still is, 3.0 is in 3-9). Writes ``fairface.json`` (every
figure), ``fairface_photos.json`` (per photo, with its labels: keep it out of the repo),
``fairface.md`` (the table) and ``fairface.png`` (the plot) in ``--out``.

Run: ``python tools/eval_fairface.py --model runs/cpu [--data ../shared/data/fairface_dev]
[--out runs/cpu/fairface] [--photo-set detector=haar]`` (about a minute on two cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

GROUPS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
LOWER = np.array([0, 3, 10, 20, 30, 40, 50, 60, 70])  # each group's first year


def age_group(years: float) -> str:
    """FairFace's group of an age in years.

    >>> [age_group(a) for a in (0.5, 2.99, 3.0, 19.9, 20, 69.99, 70, 101)]
    ['0-2', '0-2', '3-9', '10-19', '20-29', '60-69', '70+', '70+']
    """
    return GROUPS[int(np.searchsorted(LOWER, years, side="right")) - 1]


def central(records: list[dict], shape) -> dict:
    """The record whose face box centre is nearest the image centre."""
    cy, cx = shape[0] / 2, shape[1] / 2

    def dist(r):
        x, y, w, h = r["box"]
        return (x + w / 2 - cx) ** 2 + (y + h / 2 - cy) ** 2

    return min(records, key=dist)


def run(
    model: str, data: Path, photo_set: list[str], detect: bool, batch_size: int, dtype="fp32"
) -> list[dict]:
    from faceattrs import config as cfgmod
    from faceattrs.photo import PhotoConfig, load_image
    from faceattrs.predict import FaceAnalyzer

    truth = json.loads((data / "ground_truth.json").read_text())
    photo = cfgmod.resolve(PhotoConfig, {}, None, photo_set)
    backend = "onnx" if dtype == "int8" else "torch"
    an = FaceAnalyzer(model, backend=backend, dtype=dtype, photo=photo, batch_size=batch_size)
    paths = [str(data / t["filename"]) for t in truth]
    records = an.analyze(paths, detect=detect, on_error="record")
    by_file: dict[str, list[dict]] = {}
    for r in records:
        by_file.setdefault(r["file"], []).append(r)
    rows = []
    for t, p in zip(truth, paths, strict=True):
        faces = [r for r in by_file.get(p, []) if "error" not in r]
        row = {"file": t["filename"], "gender": t["gender"], "age": t["age"], "faces": len(faces)}
        if faces:
            r = central(faces, load_image(p).shape) if len(faces) > 1 else faces[0]
            row["pred_gender"] = r["gender"]["label"]
            row["p_female"] = r["gender"]["probabilities"]["Female"]
            if r.get("age"):
                row["pred_age"] = r["age"]["value"]
                row["pred_group"] = age_group(r["age"]["value"])
        rows.append(row)
    return rows


def summarise(rows: list[dict], thresholds: dict | None = None) -> dict:
    """Found rate, gender accuracy and age-group accuracy (of all photos), overall and per
    age group x gender; plus the share of photos called Female and the age confusion; and
    for the photos with a face, gender accuracy when only the most confident are answered
    (``gender_selective``), also above each of ``thresholds`` (``{"from": where they were
    read, "values": [p, ...]}``, e.g. the test split's: how they carry over)."""
    has_age = any("pred_group" in r for r in rows)

    def stats(sel: list[dict]) -> dict:
        n = len(sel)
        if not n:
            keys = ["found", "gender_acc", "said_female", "gender_acc_found"]
            keys += ["age_acc", "age_within_one_group"] if has_age else []
            return {"photos": 0, **dict.fromkeys(keys)}
        found = sum(r["faces"] > 0 for r in sel)
        out = {
            "photos": n,
            "found": found / n,
            "gender_acc": sum(r.get("pred_gender") == r["gender"] for r in sel) / n,
            "said_female": sum(r.get("pred_gender") == "Female" for r in sel) / n,
            "gender_acc_found": (
                sum(r.get("pred_gender") == r["gender"] for r in sel) / found if found else None
            ),
        }
        if has_age:
            out["age_acc"] = sum(r.get("pred_group") == r["age"] for r in sel) / n
            near = [
                abs(GROUPS.index(r["pred_group"]) - GROUPS.index(r["age"])) <= 1
                for r in sel
                if "pred_group" in r
            ]
            out["age_within_one_group"] = sum(near) / n
        return out

    res = {"overall": stats(rows), "by_age": {}, "by_gender": {}, "by_age_gender": {}}
    for g in GROUPS:
        res["by_age"][g] = stats([r for r in rows if r["age"] == g])
        for s in ("Male", "Female"):
            res["by_age_gender"][f"{g} {s}"] = stats(
                [r for r in rows if r["age"] == g and r["gender"] == s]
            )
    for s in ("Male", "Female"):
        res["by_gender"][s] = stats([r for r in rows if r["gender"] == s])
    found = [r for r in rows if "p_female" in r]
    if found:  # answering only the most confident photos (gender), as evaluate's "selective"
        from faceattrs.metrics import selective

        y = np.array([r["gender"] == "Female" for r in found], int)
        p = np.array([r["p_female"] for r in found])
        res["gender_selective"] = selective(y, np.stack([1 - p, p], 1))
        if thresholds:
            conf, right = np.maximum(p, 1 - p), (p > 0.5) == y

            def above(t: float) -> dict:
                kept = conf >= t
                acc = round(float(right[kept].mean()), 4) if kept.any() else None
                return {"threshold": t, "share": round(float(kept.mean()), 4),
                        "accuracy": acc, "n": int(kept.sum())}  # fmt: skip

            res["gender_selective"]["above"] = {
                "from": thresholds["from"],
                "rows": [above(t) for t in thresholds["values"]],
            }
    if has_age:
        conf = np.zeros((len(GROUPS), len(GROUPS)), int)
        for r in rows:
            if "pred_group" in r:
                conf[GROUPS.index(r["age"]), GROUPS.index(r["pred_group"])] += 1
        res["age_confusion"] = {"groups": list(GROUPS), "rows_true_cols_pred": conf.tolist()}
    return res


def table(res: dict) -> str:
    has_age = "age_acc" in res["overall"]
    head = "| age group | photos | found | gender acc | said Female | gender acc M / F |"
    head += " age-group acc | within one group |" if has_age else ""
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def line(name, s, m, f):
        cells = [
            name,
            str(s["photos"]),
            pct(s["found"]),
            pct(s["gender_acc"]),
            pct(s["said_female"]),
            f"{pct(m['gender_acc'])} / {pct(f['gender_acc'])}",
        ]
        if has_age:
            cells += [pct(s["age_acc"]), pct(s["age_within_one_group"])]
        return "| " + " | ".join(cells) + " |"

    for g in GROUPS:
        lines.append(
            line(
                g,
                res["by_age"][g],
                res["by_age_gender"][f"{g} Male"],
                res["by_age_gender"][f"{g} Female"],
            )
        )
    lines.append(
        line("**all**", res["overall"], res["by_gender"]["Male"], res["by_gender"]["Female"])
    )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from faceattrs.plots.common import save

    metrics = [("found", "face found"), ("gender_acc", "gender correct")]
    if "age_acc" in res["overall"]:
        metrics.append(("age_acc", "age group correct"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), sharey=True)
    x = np.arange(len(GROUPS))
    for ax, (key, label) in zip(np.atleast_1d(axes), metrics, strict=True):
        for k, (s, color) in enumerate((("Male", "tab:blue"), ("Female", "tab:red"))):
            v = [res["by_age_gender"][f"{g} {s}"][key] for g in GROUPS]
            v = [np.nan if a is None else a for a in v]
            ax.bar(x + (k - 0.5) * 0.4, v, 0.4, label=s, color=color)
        ax.axhline(res["overall"][key], color="k", lw=1, ls="--", label="all photos")
        ax.set_xticks(x, GROUPS, rotation=60)
        ax.set_title(label)
        ax.set_ylim(0, 1.02)
    np.atleast_1d(axes)[0].set_ylabel("share of photos (15 per bar)")
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    save(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a run folder (with RUN/age for ages)")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/fairface_dev"))
    ap.add_argument("--out", type=Path, help="output folder (default: MODEL/fairface)")
    ap.add_argument(
        "--photo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a faceattrs.photo.PhotoConfig setting, e.g. detector=haar (repeatable)",
    )
    ap.add_argument("--no-detect", action="store_true", help="the whole photo is the face")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--dtype",
        choices=("fp32", "int8"),
        default="fp32",
        help="int8: --model is an int8 export (faceattrs export --int8), run on onnxruntime",
    )
    ap.add_argument(
        "--thresholds-from",
        type=Path,
        metavar="METRICS",
        help="a metrics.json of faceattrs evaluate: how its gender confidence thresholds "
        "(gender.selective) carry over to these photos",
    )
    args = ap.parse_args(argv)
    from faceattrs.exceptions import FaceattrsError
    from faceattrs.io import write_json_atomic, write_text_atomic

    try:
        thresholds = None
        if args.thresholds_from is not None:
            try:
                at = json.loads(args.thresholds_from.read_text())["gender"]["selective"]["at"]
                values = [float(a["threshold"]) for a in at]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise FaceattrsError(
                    f"--thresholds-from {args.thresholds_from}: no gender.selective ({e})"
                ) from None
            thresholds = {"from": str(args.thresholds_from), "values": values}
        if not (args.data / "ground_truth.json").is_file():
            raise FaceattrsError(f"{args.data}: no ground_truth.json (not a fairface_dev folder)")
        rows = run(
            args.model, args.data, args.photo_set, not args.no_detect, args.batch_size, args.dtype
        )
    except FaceattrsError as e:
        print(f"eval_fairface: error: {e}", file=sys.stderr)
        return 2
    res = summarise(rows, thresholds)
    res["settings"] = {
        "model": args.model,
        "photo_set": args.photo_set,
        "detect": not args.no_detect,
        "dtype": args.dtype,
    }
    out = args.out or Path(args.model) / "fairface"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "fairface.json", res)
    write_json_atomic(out / "fairface_photos.json", rows)  # per photo (holds the labels)
    md = table(res)
    write_text_atomic(out / "fairface.md", md)
    opts = " ".join(args.photo_set) + (" --no-detect" if args.no_detect else "")
    plot(res, out / "fairface.png", f"fairface_dev, {args.model} {opts}".strip())
    print(md, end="")
    print(f"-> {out}/fairface.json, fairface_photos.json, fairface.md, fairface.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
