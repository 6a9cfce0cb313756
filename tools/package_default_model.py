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
    (``analyzer``: more settings of :class:`faceattrs.FaceAnalyzer`, e.g. ``dtype``).

    For a model that takes other faces than the CSV's 48x48 grayscale (its input contract),
    ``data`` is a folder of labelled photos (``AGE_GENDER_ETHNICITY_*.jpg``, e.g. the shared
    ``photos/``): the first ``n`` go through the whole photo path (detect, crop as the model
    was trained, predict), each photo's largest face scored."""
    import numpy as np

    import faceattrs
    from faceattrs.bundle import resolve
    from faceattrs.inputs import GRAY48
    from faceattrs.prepare import load_faces

    if resolve(model_dir).input != GRAY48:
        return _check_photos(model_dir, data, n, **analyzer)
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


def _check_photos(model_dir: Path, folder: Path, n: int, **analyzer) -> dict:
    import numpy as np

    import faceattrs
    from faceattrs.data import PHOTO_NAME
    from faceattrs.labels import ETHNICITIES, GENDERS

    photos = sorted(p for p in Path(folder).glob("*.jpg") if PHOTO_NAME.match(p.name))[:n]
    if not photos:
        raise SystemExit(f"package_default_model: no labelled photos in {folder}")
    an = faceattrs.FaceAnalyzer(model=model_dir, photo_workers="threads", **analyzer)
    g = e = 0
    errors = []
    for p in photos:
        recs = an.analyze(str(p), on_error="record")
        faces = [r for r in recs if "error" not in r]
        age, gender, eth = (int(v) for v in PHOTO_NAME.match(p.name).groups())
        if not faces:
            errors.append(float(age))  # no face: counted wrong, and as far as the age itself
            continue
        r = max(faces, key=lambda r: r["box"][2] * r["box"][3])  # the photo's main face
        g += r["gender"]["label"] == GENDERS[gender]
        e += r["ethnicity"]["label"] == ETHNICITIES[eth]
        errors.append(abs(r["age"]["value"] - age))
    return {
        "split": "photos",
        "folder": Path(folder).name,
        "first_n": len(photos),
        "gender_accuracy": g / len(photos),
        "ethnicity_accuracy": e / len(photos),
        "age_mae": float(np.mean(errors)),
    }


def add_check_options(ap) -> None:
    """``--check-n`` and ``--check-data``: the recorded check's faces (both packaging tools)."""
    ap.add_argument("--check-n", type=int, default=512)
    ap.add_argument(
        "--check-data",
        type=Path,
        default=None,
        help="data of the recorded check (default: --data; a photo folder for a model that "
        "takes other faces than the CSV's, e.g. ../shared/data/photos)",
    )


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
    ap.add_argument(
        "--csv",
        type=Path,
        default=REPO.parent / "shared/data/utkface48.csv.gz",
        help="the training data as given to prepare (a CSV, or a photo folder), for the record",
    )
    add_check_options(ap)
    ap.add_argument("--licence", default=LICENCE, help="the weights' terms, for the record")
    ap.add_argument(
        "--dest", type=Path, default=DEST, help="where to write it (default: the default model)"
    )
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

    with atomic_folder(args.dest) as tmp:  # the old model or the new one, never a mix
        build(args, run, age, tmp)
    size = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    check = json.loads((args.dest / "provenance.json").read_text())["check"]
    print(f"model: {args.dest} ({size / 1e6:.1f} MB); check {check}")
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
        "licence": args.licence,
        "commands": args.command,
        "trained_at_commit": commit,
        "training_data": {
            "name": args.csv.name,
            "sha256": file_sha256(args.csv) if args.csv.is_file() else None,
            "prepared_key": cfg.get("data_key"),  # the prepared data's content key
        },
        "initial_weights": cfg.get("init"),
        "machine": args.machine
        or {"processor": platform.processor() or platform.machine(), "cores": 2},
        "age_model_fine_tuned_from": Path(age_from).name if age_from else None,
        "check": check_figures(tmp, args.check_data or args.data, args.check_n),
    }
    (tmp / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
