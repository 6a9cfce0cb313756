"""Quantize the default model shipped in the package to int8 and ship that export beside it
(``src/faceattrs/assets/default_model_int8/``), the fast path of ``faceattrs predict
--dtype int8``.

    python tools/package_int8_model.py --data local/prepared

The export is ``faceattrs export --int8`` of the bundled model: every graph static int8,
its activation ranges measured on ``--calib-faces`` faces of the TRAINING split of
``--data`` (the data the default model was trained on; never validation or test). Beside
the graph and its manifest (``source`` made relative: ``../default_model``, for
Grad-CAM, which runs in PyTorch) it writes ``provenance.json``: the licence, the command,
and gender / ethnicity accuracy and age MAE of the int8 graph on the first ``--check-n``
validation faces, which ``tests/test_default_model.py`` recomputes. The folder is replaced
as a whole (built beside it, swapped in).

Whether int8 costs accuracy is measured by ``tools/compare_backends.py`` on the
validation split, judged by ``docs/results/rules/int8-fast-path.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from package_default_model import LICENCE, REPO, add_check_options, check_figures  # noqa: E402

COMMAND = "python tools/package_int8_model.py --data PREPARED"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="the default model's training data")
    ap.add_argument("--calib-faces", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    add_check_options(ap)
    args = ap.parse_args(argv)
    from faceattrs.bundle import DEFAULT_INT8_DIR, DEFAULT_MODEL_DIR, ONNX_MANIFEST
    from faceattrs.export import calibration_draw, export_onnx
    from faceattrs.io import atomic_folder
    from faceattrs.prepare import load_faces

    if not args.data.exists():
        sys.exit(f"package_int8_model: {args.data} does not exist")
    faces = load_faces(args.data)
    calib, check = calibration_draw(faces.indices("train"), args.calib_faces, args.seed)
    default_cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    record = {
        "split": "train",
        "data": default_cfg.get("data"),  # the CSV's name, as the default model records it
        "prepared_key": _prepared_key(args.data),
        "seed": args.seed,
        "check": "256 other training faces",
    }
    with tempfile.TemporaryDirectory(prefix="faceattrs-int8-") as tmp:
        out = Path(tmp) / "int8"
        export_onnx(
            None,
            out,
            int8=True,
            calib_faces=faces.images[calib],
            check_faces=faces.images[check],
            calibration=record,
        )
        manifest = json.loads((out / ONNX_MANIFEST).read_text())
        manifest["source"] = "../default_model"  # relative to this folder, inside the package
        (out / ONNX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        licence = json.loads((DEFAULT_MODEL_DIR / "provenance.json").read_text()).get("licence")
        prov = {
            "licence": licence or LICENCE,  # the terms of the model it quantizes
            "command": COMMAND,
            "of": "the default model (assets/default_model), quantized; see its provenance",
            "check": check_figures(
                out, args.check_data or args.data, args.check_n, backend="onnx", dtype="int8"
            ),
        }
        (out / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
        with atomic_folder(DEFAULT_INT8_DIR) as stage:
            for f in out.iterdir():
                shutil.copy2(f, stage / f.name)
    size = sum(p.stat().st_size for p in DEFAULT_INT8_DIR.rglob("*") if p.is_file())
    shown = DEFAULT_INT8_DIR
    if shown.is_relative_to(REPO):
        shown = shown.relative_to(REPO)
    print(f"int8 default model: {shown} ({size / 1e6:.1f} MB); check {prov['check']}")
    print(f"against PyTorch on 256 other training faces: {manifest['check']}")
    return 0


def _prepared_key(data: Path) -> str | None:
    m = data / "manifest.json"
    return json.loads(m.read_text()).get("key") if m.is_file() else None


if __name__ == "__main__":
    raise SystemExit(main())
