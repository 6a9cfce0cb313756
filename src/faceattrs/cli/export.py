"""Export the models of a run to ONNX (dynamic batch), for onnxruntime.

faceattrs export --model runs/cpu --out runs/cpu/onnx
faceattrs export --model runs/cpu --out runs/cpu/onnx-int8 --int8 --data prepared/
faceattrs predict photos/ --model runs/cpu/onnx --backend onnx
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--model", help="run folder (default: the model bundled with the package)")
    p.add_argument("--out", required=True, help="folder for the .onnx graphs and their manifest")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="quantize to int8 (about 2x faster on CPUs), calibrated on training faces",
    )
    p.add_argument(
        "--data",
        help="with --int8: prepared folder or CSV whose TRAINING split gives the calibration "
        "faces (default: the data recorded with the run)",
    )
    p.add_argument(
        "--calib-faces",
        type=int,
        default=512,
        help="with --int8: training faces used for calibration (default 512)",
    )
    p.add_argument("--seed", type=int, default=0, help="with --int8: which faces are drawn")


def run(args) -> int:
    from ..exceptions import FaceattrsError
    from ..export import export_onnx

    if not args.int8 and (args.data is not None or args.calib_faces != 512):
        raise FaceattrsError("--data and --calib-faces belong to --int8")
    kw = {}
    if args.int8:
        kw = calibration_faces(args)
    manifest = export_onnx(args.model, args.out, opset=args.opset, int8=args.int8, **kw)
    check = json.loads(manifest.read_text()).get("check", {})
    diffs = {k: v for k, v in check.items() if k != "faces" and not k.endswith("_agreement")}
    same = {k[: -len("_agreement")]: v for k, v in check.items() if k.endswith("_agreement")}
    log.info(
        "wrote %s; onnxruntime vs PyTorch on %d faces, max abs difference: %s; same class: %s",
        manifest.parent,
        check.get("faces", 0),
        ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()),
        ", ".join(f"{k} {v:.1%}" for k, v in same.items()),
    )
    return 0


def calibration_faces(args) -> dict:
    """``calib_faces`` (training faces) and ``check_faces`` (other training faces) for an
    int8 export, with the record of where they came from."""
    from ..evaluate import data_path
    from ..exceptions import FaceattrsError
    from ..export import calibration_draw
    from ..prepare import load_faces

    if args.calib_faces < 16:
        raise FaceattrsError(f"--calib-faces must be at least 16, got {args.calib_faces}")
    if args.seed < 0:
        raise FaceattrsError(f"--seed must be at least 0, got {args.seed}")
    path = data_path(args.model, args.data)
    if not path.exists():
        hint = "" if args.data is not None else " (the path recorded with the model): pass --data"
        raise FaceattrsError(f"data not found: {path}{hint}")
    faces = load_faces(path)
    idx = faces.indices("train")
    if len(idx) == 0:
        raise FaceattrsError(f"{path} has no training rows to calibrate on")
    if len(idx) <= args.calib_faces:
        log.info(
            "calibrating on all %d training faces (--calib-faces %d)", len(idx), args.calib_faces
        )
    calib, check = calibration_draw(idx, args.calib_faces, args.seed)
    return {
        "calib_faces": faces.images[calib],
        "check_faces": faces.images[check],
        "calibration": {
            "split": "train",
            "data": str(path),
            "seed": args.seed,
            "check": "other training faces" if len(idx) > args.calib_faces else "the same faces",
        },
    }
