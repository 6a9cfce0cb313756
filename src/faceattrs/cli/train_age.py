"""Train the age model (coarse bins + per-bin regressors, and the direct head) on top of a
trained multitask model.

    faceattrs train-age --model runs/cpu --data ../shared/data/utkface48.csv.gz \\
        --out runs/cpu/age --preset cpu

The age run folder is a complete model bundle (it refers to its multitask run), so
``--model AGE_RUN`` works for evaluate, predict, explain and export.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="multitask run folder (from `faceattrs train`)")
    p.add_argument("--data", required=True, help="prepared folder, face CSV or photo folder")
    p.add_argument("--out", help="age run folder to write (default: MODEL/age)")
    p.add_argument("--preset", default="paper", help="settings preset: paper or cpu")
    p.add_argument(
        "--bins",
        help="explicit inner bin edges, e.g. 16,26,29,37,53 (the "
        "reference's); default: quantiles of the training ages",
    )
    p.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--no-direct", action="store_true", help="skip the direct age head")
    p.add_argument("--overwrite", action="store_true", help="replace an age model in --out")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of AgeConfig, e.g. --set finetune_epochs=3",
    )


def run(args) -> int:
    from pathlib import Path

    from .. import config as cfgmod
    from ..age import PRESETS, AgeConfig, train_age
    from ..devices import check_device
    from ..prepare import load_faces

    overrides = cfgmod.parse_overrides(args.overrides)
    if args.bins:
        overrides["edges"] = args.bins
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.no_direct:
        overrides["direct"] = False
    cfg = cfgmod.resolve(AgeConfig, PRESETS, args.preset, overrides)
    check_device(args.device)
    out = Path(args.out) if args.out else Path(args.model) / "age"
    faces = load_faces(args.data)
    summary = train_age(
        args.model,
        faces,
        out,
        cfg,
        device=args.device,
        info={"data": str(args.data), "preset": args.preset},
        overwrite=args.overwrite,
    )
    t = summary["test"] or summary["val"]
    split = "test" if summary["test"] else "val"
    direct = "n/a" if t["direct_mae"] is None else f"{t['direct_mae']:.2f}"
    print(
        f"age model -> {out}\n"
        f"bins {', '.join(summary['bin_labels'])}\n"
        f"{split}: bin accuracy {t['bin_accuracy']:.3f}, macro-F1 {t['bin_macro_f1']:.3f}; "
        f"MAE hard {t['mae_hard']:.2f}, soft {t['mae_soft']:.2f}, "
        f"oracle bins {t['mae_oracle_bins']:.2f}, direct head {direct} years\n"
        f"default: {t['approach']}"
        + (f" ({t['routing']} routing)" if t["approach"] == "two_stage" else "")
        + f", MAE {t['default_mae']:.2f}; {summary['seconds']:.0f} s"
    )
    return 0
