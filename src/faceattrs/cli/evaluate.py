"""Metrics and figures of a trained model on the test split, the validation split or every
row of an external CSV (``--split all``: no de-duplication, no split).

    faceattrs evaluate --model runs/paper
    faceattrs evaluate --model runs/paper --data other.csv --split all --out runs/paper/eval_other

Writes metrics.json, predictions.npz and figures (confusion matrices, gender ROC,
reliability diagrams, fairness bars, captioned faces) into RUN/eval by default.
"""

from __future__ import annotations

from pathlib import Path

from ..exceptions import FaceattrsError


def add_common(p, split: bool = True, model_required: bool = False) -> None:
    """Arguments shared by the evaluation commands (evaluate, explain, errors, calibrate)."""
    if model_required:
        p.add_argument("--model", required=True, metavar="RUN", help="run folder holding best.json")
    else:
        p.add_argument(
            "--model",
            metavar="RUN",
            help="run folder holding best.json (default: the model bundled with the package)",
        )
    p.add_argument(
        "--data",
        metavar="PATH",
        help="prepared folder or CSV (default: the data recorded in RUN/config.json)",
    )
    if split:
        p.add_argument(
            "--split",
            default="test",
            choices=("test", "val", "all"),
            help="rows to use (default test; 'all' = every row of a CSV, as is)",
        )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def add_arguments(p) -> None:
    add_common(p)
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default RUN/eval, RUN/eval_SPLIT; ./eval... for the bundled model)",
    )
    p.add_argument("--grid", type=int, default=24, help="faces in the captioned grid (default 24)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="resamples of the 95 %% bootstrap intervals in metrics.json's ci95 (default "
        "1000; 0: none)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "int8"),
        default="fp32",
        help="int8: evaluate an int8 ONNX export on onnxruntime (without --model: the "
        "bundled one; --data is then required)",
    )


def run(args) -> int:
    from ..evaluate import default_out, evaluate_run, load_data, resolve_device

    if args.dtype == "int8":
        if args.device not in (None, "cpu"):
            raise FaceattrsError("--dtype int8 runs on the CPU (onnxruntime): leave out --device")
        device = "cpu"
        if args.data is None:
            raise FaceattrsError("--dtype int8 needs --data (an export records no data path)")
    else:
        device = resolve_device(args.device)  # checked: one line before any work
    if args.grid < 0:
        raise FaceattrsError(f"--grid must be at least 0, got {args.grid}")
    if args.bootstrap < 0 or 0 < args.bootstrap < 100:
        raise FaceattrsError(f"--bootstrap must be 0 (none) or at least 100, got {args.bootstrap}")
    faces = load_data(args.model, args.data, args.split)
    out = Path(args.out) if args.out else default_out(args.model, "eval", args.split)
    if args.dtype == "int8" and not args.out:  # never inside an export folder
        out = default_out(None, "eval", args.split).with_name(f"{out.name}_int8")
    evaluate_run(
        args.model,
        faces,
        args.split,
        out,
        device=device,
        n_grid=args.grid,
        dtype=args.dtype,
        resamples=args.bootstrap,
    )
    print(out / "metrics.json")
    return 0
