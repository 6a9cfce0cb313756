"""Copy a finished training run (multitask + calibration + age/) into the package as its
default model, with a provenance file that the tests check.

    python tools/package_default_model.py --run runs/default --data local/prepared

What it writes (``src/faceattrs/assets/default_model/``, replaced as a whole: the new
folder is built beside it and swapped into place by ``faceattrs.io.atomic_folder``, so a
kill, or a failure while building, leaves the old folder or the new one):

- the multitask run's ``best.*``, ``config.json`` and ``calibration.json``;
- the age run's ``age.json``, ``coarse.*``, ``regressors.safetensors`` (and ``direct.*``
  when it is the default approach), with the multitask link made relative (``..``) and the
  absolute training path dropped; for a network with its own age head (three heads),
  ``age/age.json`` alone (written by ``faceattrs calibrate``);
- ``provenance.json``: the commands, the training data's name and hash, the machine, the
  run the age model was fine-tuned from, and a check: gender / ethnicity accuracy
  and age MAE of the packaged model on the first ``--check-n`` validation faces, which
  ``tests/test_default_model.py`` recomputes.

UTKFace, on which the model is trained, is for non-commercial research only; the
provenance says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEST = REPO / "src" / "faceattrs" / "assets" / "default_model"
LICENCE = (
    "Trained on UTKFace-derived faces (the 48x48 'Age, Gender and Ethnicity Face Data' CSV "
    "layout), which is for non-commercial research only: so are these weights."
)


def check_figures(model_dir: Path, data: Path, n: int, **analyzer) -> dict:
    """Accuracy of both heads and the age MAE on the first ``n`` validation faces
    (``analyzer``: more settings of :class:`faceattrs.FaceAnalyzer`, e.g. ``dtype``)."""
    import numpy as np

    import faceattrs
    from faceattrs.prepare import load_faces

    faces = load_faces(data)
    val = faces.take(faces.indices("val")[:n])
    analyzer = faceattrs.FaceAnalyzer(model=model_dir, **analyzer)
    records = analyzer.analyze(list(val.images), detect=False)  # the chips are the faces
    gender = [r["gender"]["label"] for r in records]
    eth = [r["ethnicity"]["label"] for r in records]
    from faceattrs.labels import ETHNICITIES, GENDERS

    age = np.array([r["age"]["value"] for r in records])
    return {
        "split": "val",
        "first_n": int(len(val)),
        "gender_accuracy": float(np.mean(np.array(GENDERS)[val.gender] == np.array(gender))),
        "ethnicity_accuracy": float(np.mean(np.array(ETHNICITIES)[val.ethnicity] == np.array(eth))),
        "age_mae": float(np.mean(np.abs(age - val.age))),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="multitask run folder with age/")
    ap.add_argument("--data", type=Path, required=True, help="the prepared data it was trained on")
    ap.add_argument(
        "--age",
        type=Path,
        default=None,
        help="the age run to ship (default RUN/age); it may come from another multitask run "
        "trained on the same data and split: the age model is a network of its own",
    )
    ap.add_argument("--csv", type=Path, default=REPO.parent / "shared/data/utkface48.csv.gz")
    ap.add_argument("--check-n", type=int, default=512)
    ap.add_argument("--command", default="", help="the training commands, for the record")
    ap.add_argument(
        "--machine",
        default="",
        help="where the networks were trained, for the record (default: this machine)",
    )
    args = ap.parse_args(argv)
    from faceattrs.io import atomic_folder

    run, age = args.run, args.age or args.run / "age"
    for f in ("best.json", "best.safetensors", "config.json", "calibration.json"):
        if not (run / f).exists():
            sys.exit(f"package_default_model: {run / f} is missing")
    if not (age / "age.json").exists():
        sys.exit(
            f"package_default_model: {age / 'age.json'} is missing (run train-age, or "
            "calibrate a network with its own age head)"
        )

    with atomic_folder(DEST) as tmp:  # the old model or the new one, never a mix
        build(args, run, age, tmp)
    size = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file())
    check = json.loads((DEST / "provenance.json").read_text())["check"]
    print(f"default model: {DEST} ({size / 1e6:.1f} MB); check {check}")
    return 0


def build(args, run: Path, age: Path, tmp: Path) -> None:
    """Write the default model's files into the staging folder ``tmp``."""
    from faceattrs.prepare import file_sha256

    (tmp / "age").mkdir(parents=True)
    for f in ("best.json", "best.safetensors", "calibration.json"):
        shutil.copy2(run / f, tmp / f)
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"] = args.csv.name  # the training data's name, not this machine's path
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    meta = json.loads((age / "age.json").read_text())
    age_from = meta.get("multitask_absolute")  # the run its coarse model was fine-tuned from
    meta["multitask"] = ".."
    meta.pop("multitask_absolute", None)
    meta.pop("data", None)
    names = ["coarse.json", "coarse.safetensors", "regressors.safetensors"]
    if meta.get("direct") == "multitask":  # the age head of the multitask network itself
        names = []
    elif meta["approach"] == "direct":
        names += ["direct.json", "direct.safetensors"]
    else:
        meta["direct"] = False  # the two-stage model is the default: leave the direct head out
    for f in names:
        shutil.copy2(age / f, tmp / "age" / f)
    (tmp / "age" / "age.json").write_text(json.dumps(meta, indent=2) + "\n")

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    prov = {
        "licence": LICENCE,
        "commands": args.command,
        "trained_at_commit": commit,
        "training_data": {
            "name": args.csv.name,
            "sha256": file_sha256(args.csv) if args.csv.exists() else None,
        },
        "machine": args.machine
        or {"processor": platform.processor() or platform.machine(), "cores": 2},
        "age_model_fine_tuned_from": Path(age_from).name if age_from else None,
        "check": check_figures(tmp, args.data, args.check_n),
    }
    (tmp / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
