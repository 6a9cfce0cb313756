"""Read, validate, de-duplicate and split a face CSV (plain or .gz) or a folder of
UTKFace-style photos into a prepared folder that every later stage reads.

    faceattrs prepare --data ../shared/data/utkface48.csv.gz --out prepared/utkface48
"""

from __future__ import annotations

import json

from ..config import resolve
from ..prepare import PrepareConfig, prepare


def add_arguments(p) -> None:
    p.add_argument(
        "--data", required=True, help="CSV / CSV.gz in the public layout, or a photo folder"
    )
    p.add_argument("--out", required=True, help="folder to write the prepared dataset into")
    p.add_argument(
        "--near-threshold", type=float, help="cosine similarity for near duplicates (default 0.98)"
    )
    p.add_argument(
        "--on-conflict",
        choices=["keep", "drop"],
        help="copies with disagreeing labels: keep the first of each group, or drop the group "
        "(default keep)",
    )
    p.add_argument(
        "--on-bad-row",
        choices=["error", "skip"],
        help="invalid rows: stop (default error), or skip and count",
    )
    p.add_argument("--seed", type=int, help="split seed (default 0)")
    p.add_argument(
        "--size",
        type=int,
        help="photo folders: store the faces at this side in pixels (default 48)",
    )
    p.add_argument(
        "--crop", choices=["utkface", "dlib"],
        help="photo folders: the faces' framing (utkface: as the photos are; dlib: dlib's face "
        "chip from the 5 landmarks, for the dlib-based model; default utkface)",
    )  # fmt: skip
    p.add_argument(
        "--color", action="store_true",
        help="photo folders: store the faces in RGB (default: grayscale, as the CSV)",
    )  # fmt: skip


def run(args) -> int:
    overrides = {
        k: v
        for k, v in {
            "near_threshold": args.near_threshold,
            "on_conflict": args.on_conflict,
            "on_bad_row": args.on_bad_row,
            "seed": args.seed,
            "image_size": args.size,
            "channels": 3 if args.color else None,
            "crop": args.crop,
        }.items()
        if v is not None
    }
    cfg = resolve(PrepareConfig, {}, None, overrides)
    report = prepare(args.data, args.out, cfg)
    keys = (
        "rows_read",
        "rows_invalid",
        "exact_removed",
        "near_removed",
        "conflicting_groups",
        "rows_kept",
        "split_sizes",
    )
    print(json.dumps({k: report[k] for k in keys}, indent=1))
    print(f"prepared data in {args.out}")
    return 0
