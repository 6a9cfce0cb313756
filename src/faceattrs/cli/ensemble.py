"""Join trained runs of one design into one model that averages their logits.

faceattrs ensemble runs/a runs/b --out runs/ab
faceattrs calibrate --model runs/ab
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", help="run folders (or checkpoints) of the same design")
    p.add_argument("--out", required=True, help="new folder for the ensemble's run")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="store the weights in half precision (half the file; calibrate the result)",
    )


def run(args) -> int:
    from ..ensemble import build_ensemble

    path = build_ensemble(args.runs, args.out, fp16=args.fp16)
    print(f"wrote {path}; next: faceattrs calibrate --model {path.parent}")
    return 0
