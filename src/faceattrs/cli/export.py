"""Export the models of a run to ONNX (dynamic batch), for onnxruntime.

faceattrs export --model runs/cpu --out runs/cpu/onnx
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


def run(args) -> int:
    from ..export import export_onnx

    manifest = export_onnx(args.model, args.out, opset=args.opset)
    check = json.loads(manifest.read_text()).get("check", {})
    log.info(
        "wrote %s; onnxruntime vs PyTorch, max abs difference: %s",
        manifest.parent,
        ", ".join(f"{k} {v:.1e}" for k, v in check.items() if k != "faces"),
    )
    return 0
