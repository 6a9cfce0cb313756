"""Compare face detectors and the alignment on real and composed photos (docs/photos.md).

Candidates (all shipped inside pip packages, nothing downloaded at run time):

- ``haar``: OpenCV's Haar cascades, the faceattrs pipeline before dlib (``detector=haar``);
- ``hog``: dlib's HOG detector, one pass;
- ``hog+retry``: HOG, then on a miss a padded 2x pass (small images) and the image turned
  by +-30 degrees;
- ``hog+retry+cnn`` (the default): then dlib's CNN (face_recognition_models) on a miss;
- ``cnn``: the CNN alone (slow: on the first ``--cnn-limit`` images of each set).

Sets: ``fairface_dev`` (270 photos, one labelled face each), the 24 shared UTKFace photos,
composed scenes (tests/scenes.py): 6 faces of 64-200 px on 960x720, 6 small faces of
40-64 px on 640x480, each shared photo turned by +-30 degrees, and 7 pictures without a
face. For each: faces found, false boxes, ms per image (one thread). Then the alignment
target (eyes and nose on the shared photos) and the crop's correlation with the training
crop: the shared photo's own 48x48 resize, for the photos and for the turned photos.

Run: ``python benchmarks/compare_detectors.py ../shared/data [--json out.json]
[--sets photos,turned,no]`` (about 20 minutes on two busy cores, most of it fairface_dev
and the CNN alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from measure_margin import corr, whole48  # noqa: E402  (benchmarks/ is on the path when run)
from scenes import matches, multi_face, no_face, rotated  # noqa: E402

from faceattrs import photo  # noqa: E402
from faceattrs.photo import (  # noqa: E402
    PhotoConfig,
    detect,
    extract_faces,
    find_faces,
    load_image,
    to_gray,
)

DEFAULT = PhotoConfig()
CANDIDATES = {
    "haar": PhotoConfig(detector="haar"),
    "hog": replace(DEFAULT, hog_pad=0.0, hog_small_upsample=False, rotations=(), cnn_max_side=0),
    "hog+retry": replace(DEFAULT, cnn_max_side=0),
    "hog+retry+cnn": DEFAULT,
}


def cnn_only(gray: np.ndarray) -> list:
    long = max(gray.shape)
    found = detect._dlib_pass(gray, min(1.0, DEFAULT.cnn_max_side / long), 0.0, 0.0, 0.3)
    return [b for b, _, _ in found]


def build_sets(data: Path, seed: int = 0) -> dict:
    """name -> list of (gray image, truth or None for one face of unknown place)."""
    rng = np.random.default_rng(seed)
    ff = json.loads((data / "fairface_dev" / "ground_truth.json").read_text())
    sets = {
        "fairface_dev": [
            (to_gray(load_image(data / "fairface_dev" / r["filename"])), None) for r in ff
        ]
    }
    photos = [to_gray(load_image(p)) for p in sorted((data / "photos").glob("*.jpg"))]
    sets["photos"] = [(g, [(100.0, 100.0, 200.0)]) for g in photos]
    multi = []
    for _ in range(8):
        pick = rng.choice(len(photos), 6, replace=False)
        img, truth = multi_face(
            [photos[i] for i in pick], rng.choice([64, 80, 100, 128, 160, 200], 6), rng
        )
        multi.append((to_gray(img), truth))
    sets["scenes 6 faces 64-200 px"] = multi
    small = []
    for _ in range(8):
        pick = rng.choice(len(photos), 6, replace=False)
        img, truth = multi_face([photos[i] for i in pick], rng.integers(40, 65, 6), rng, (480, 640))
        small.append((to_gray(img), truth))
    sets["scenes 6 faces 40-64 px"] = small
    sets["turned +-30 deg"] = [rotated(g, a, rng) for g in photos for a in (30, -30)]
    sets["no face"] = [(g, []) for g in no_face(rng)]
    return sets


def measure(sets: dict, cnn_limit: int) -> dict:
    out = {}
    fns = {
        name: (lambda g, c=cfg: [d.box for d in find_faces(g, c)])
        for name, cfg in CANDIDATES.items()
    }
    fns["cnn"] = cnn_only
    find_faces(np.zeros((64, 64), np.uint8))  # load the models before timing
    cnn_only(np.zeros((64, 64), np.uint8))
    print("\n== detectors: faces found / faces, false boxes, ms per image (one thread)")
    for set_name, items in sets.items():
        for name, fn in fns.items():
            use = items[:cnn_limit] if name == "cnn" else items
            hit = false = total = 0
            t = time.perf_counter()
            found = [fn(g) for g, _ in use]
            ms = (time.perf_counter() - t) / len(use) * 1e3
            for boxes, (_, truth) in zip(found, use, strict=True):
                if truth is None:  # one face, place unknown: found = any box
                    hit, total = hit + bool(boxes), total + 1
                    false += max(0, len(boxes) - 1)
                else:
                    h, f = matches(boxes, truth)
                    hit, false, total = hit + h, false + f, total + len(truth)
            row = {
                "found": hit,
                "faces": total,
                "false": false,
                "ms": round(ms, 1),
                "images": len(use),
            }
            out.setdefault(set_name, {})[name] = row
            print(
                f"  {set_name:26s} {name:14s} {hit:4d} / {total:4d}  false {false:3d}  {ms:7.1f} ms  ({len(use)} images)"
            )
    return out


def eyes_in_haar(sets: dict) -> dict:
    """Haar + eye cascades as a landmark source: faces with two eyes found in their upper half."""
    eye = PhotoConfig().classifier("haarcascade_eye.xml")
    out = {}
    for set_name in [k for k in ("fairface_dev", "photos") if k in sets]:
        n = two = 0
        for g, _ in sets[set_name]:
            for b, _, _ in photo.detect_faces(g, CANDIDATES["haar"]):
                x, y, w, h = photo.clip_box(b, g.shape)
                top = g[y : y + h // 2 + h // 8, x : x + w]
                eyes = eye.detectMultiScale(top, 1.1, 3, minSize=(max(8, w // 10),) * 2)
                n, two = n + 1, two + (len(eyes) >= 2)
        out[set_name] = {"haar_faces": n, "two_eyes": two}
        print(f"  haar + eye cascade, {set_name}: two eyes found in {two} of {n} faces")
    return out


def alignment(sets: dict) -> dict:
    print("\n== alignment: target (median over the shared photos, shares of the side)")
    marks = []
    for g, _ in sets["photos"]:
        d = find_faces(g, DEFAULT)
        if len(d) == 1:
            marks.append(photo.eye_nose(d[0].landmarks) / np.array(g.shape[::-1]))
    med = np.median(marks, 0)
    iqr = np.subtract(*np.percentile(marks, [75, 25], 0))
    for k, part in enumerate(("eye on the left", "eye on the right", "nose base")):
        print(
            f"  {part:16s} x {med[k, 0]:.3f} y {med[k, 1]:.3f}  (IQR {iqr[k, 0]:.3f}, {iqr[k, 1]:.3f}; {len(marks)} photos)"
        )
    print("\n== crop vs the training crop (whole photo, 48x48 area resize): mean pixel correlation")
    crops = {
        "haar + margin (before)": CANDIDATES["haar"],
        "dlib, scale + shift only": replace(DEFAULT, align=False),
        "dlib aligned (default)": DEFAULT,
    }
    photos = [g for g, _ in sets["photos"]]
    turned = sets["turned +-30 deg"]
    out = {"target": med.round(4).tolist()}
    for name, cfg in crops.items():
        row = {}
        for set_name, items, refs in (
            ("photos", photos, photos),
            ("turned +-30 deg", [g for g, _ in turned], [p for p in photos for _ in (0, 1)]),
        ):
            rs = []
            for g, ref in zip(items, refs, strict=True):
                faces = extract_faces(g, cfg=cfg)
                rs.append(max((corr(f.crop, whole48(ref)) for f in faces), default=np.nan))
            rs = np.array(rs)
            ok = rs[~np.isnan(rs)]
            row[set_name] = {
                "mean_r": round(float(ok.mean()), 3),
                "min_r": round(float(ok.min()), 3),
                "faces": int(ok.size),
                "images": len(rs),
            }
            print(
                f"  {name:26s} {set_name:16s} mean r {ok.mean():.3f}  min {ok.min():.3f}  ({ok.size} of {len(rs)} with a face)"
            )
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="the shared data folder (photos/, fairface_dev/)")
    ap.add_argument("--cnn-limit", type=int, default=40, help="images per set for the CNN alone")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--sets", help="only the sets whose names start with these, e.g. photos,turned")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    sets = build_sets(args.data)
    if args.sets:
        sets = {k: v for k, v in sets.items() if k.startswith(tuple(args.sets.split(",")))}
        if not {"photos", "turned +-30 deg"} <= set(sets):
            raise SystemExit("compare_detectors: --sets must include photos and turned (alignment)")
    res = {
        "detectors": measure(sets, args.cnn_limit),
        "eyes": eyes_in_haar(sets),
        "alignment": alignment(sets),
    }
    if args.json:
        from faceattrs.io import write_json_atomic

        write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
