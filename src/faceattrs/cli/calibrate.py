"""Fit temperature scaling on the validation split and save it with the model
(RUN/calibration.json, applied by prediction); ECE before and after, reliability diagrams.

    faceattrs calibrate --model runs/paper
"""

from __future__ import annotations

from .evaluate import add_common


def add_arguments(p) -> None:
    add_common(p, split=False, model_required=True)  # it writes into RUN
    p.add_argument(
        "--bins", type=int, default=15, help="equal-width confidence bins for ECE (default 15)"
    )
    p.add_argument(
        "--flip-tta",
        choices=("auto", "on", "off"),
        default="auto",
        help="average each face's outputs with its mirror image's (multitask model, and the "
        "age model when the run has one): auto (default) = when that does better on validation",
    )


def run(args) -> int:
    from ..calibrate import calibrate_run
    from ..evaluate import load_data, resolve_device

    device = resolve_device(args.device)  # checked: one line before any work
    faces = load_data(args.model, args.data, "val")
    result = calibrate_run(
        args.model,
        faces,
        n_bins=args.bins,
        device=device,
        flip_tta=args.flip_tta,
    )
    scores = result["flip_tta_selection"]["val_score"]
    print(
        f"flip TTA: {'on' if result['flip_tta'] else 'off'} "
        f"(validation score plain {scores['plain']:.4f}, flip {scores['flip']:.4f})"
    )
    a = result.get("age")
    if a and a.get("head"):
        print(
            f"age head: flip TTA {'on' if a['flip_tta'] else 'off'} as the other heads (one "
            f"pass); validation MAE {a['val_mae']:.3f}; 90 % interval refitted -> age/age.json"
        )
    elif a:
        print(
            f"age flip TTA: {'on' if a['flip_tta'] else 'off'} "
            f"(validation MAE plain {a['val_mae']['plain']:.3f}, flip {a['val_mae']['flip']:.3f})"
        )
    for head, t in result["temperatures"].items():
        parts = [
            f"{s} ECE {v['ece_before']:.4f} -> {v['ece_after']:.4f}"
            for s, v in result["heads"][head].items()
        ]
        print(f"{head}: T = {t:.3f}; " + "; ".join(parts))
    return 0
