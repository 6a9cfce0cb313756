"""Every stage in order (prepare, train, calibrate, age, evaluate, errors, explain,
report) into one run folder; prints the report's path at the end.

    faceattrs run --data ../shared/data/utkface48.csv.gz --out runs/cpu --preset cpu
    faceattrs run --data data.csv --out runs/quick --preset cpu epochs=1 width=0.125
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="face CSV (plain or .gz) or photo folder")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--preset", default="cpu", help="paper (the reference) or cpu (default)")
    p.add_argument("--no-age", action="store_true", help="skip the age model")
    p.add_argument("--explain-classes", default="Indian,Other",
                   help="ethnicities whose misclassified test faces get Grad-CAM")  # fmt: skip
    p.add_argument("--age-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an age-model setting, e.g. --age-set finetune_epochs=3")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training settings")


def run(args) -> int:
    from ..pipeline import run_all

    report = run_all(
        args.data,
        args.out,
        preset=args.preset,
        overrides=args.overrides,
        age=not args.no_age,
        age_overrides=args.age_set,
        explain_classes=args.explain_classes,
        resume=args.resume,
        progress=not args.no_progress,
    )
    print(f"report: {report}")
    return 0
