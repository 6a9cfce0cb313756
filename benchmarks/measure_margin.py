"""Measure face detection and the crop margin on the shared photos (docs/photos.md).

The training faces are whole UTKFace "aligned & cropped" 200x200 photos, grayscale,
resized to 48x48 with area interpolation. The shared photos are the same kind of image,
so for each of them the right crop is known exactly: the whole photo. This script

1. counts the photos in which each detector setting finds a face (as-is, padded);
2. fits the margin (crop side / box side, crop-centre shift) that maximises the mean
   pixel correlation between the crop made from the detected box and the whole-photo
   48x48 resize, and reports it with a leave-one-out estimate;
3. composes multi-face scenes (photos shrunk and tiled on a background) and reports
   recall, false detections and the crop correlation there, with the configured margin;
4. with ``--model RUN``: accuracy on the photos (labels are in the file names) with the
   full photo path, the ideal crop (whole photo) and ``--no-detect``.

Run: ``python benchmarks/measure_margin.py ../shared/data/photos [--model runs/cpu]``
(about a minute on two cores; add ``--dlib PATH`` to compare dlib's HOG detector when
the dlib-bin wheel is unpacked at PATH).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from faceattrs.labels import ETHNICITIES, GENDERS
from faceattrs.photo import PhotoConfig, detect_faces, load_image, to_face_crop, to_gray


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b) + 1e-12))


def whole48(gray: np.ndarray) -> np.ndarray:
    return cv2.resize(gray, (48, 48), interpolation=cv2.INTER_AREA)


def haar_once(gray, cascade: str, pad: float, min_neighbors=3, min_frac=0.0):
    h, w = gray.shape
    p = round(pad * min(h, w))
    img = cv2.copyMakeBorder(gray, p, p, p, p, cv2.BORDER_REPLICATE) if p else gray
    clf = PhotoConfig().classifier(cascade)
    ms = max(20, round(min_frac * min(h, w)))
    return clf.detectMultiScale(img, 1.1, min_neighbors, minSize=(ms, ms))


def detection_rates(grays, dlib_path: str | None) -> None:
    print("\n== 1. detection: photos with a face found, of", len(grays))
    for cascade in ("default", "alt", "alt2"):
        name = f"haarcascade_frontalface_{cascade}.xml"
        for pad in (0.0, 0.25, 0.5):
            t = time.perf_counter()
            n = sum(len(haar_once(g, name, pad)) > 0 for g in grays)
            ms = (time.perf_counter() - t) / len(grays) * 1e3
            print(f"  haar {cascade:8s} pad {pad:.2f} (faces >= 20 px): {n:2d}  {ms:5.1f} ms/photo")
    if dlib_path:
        import dlib

        det = dlib.get_frontal_face_detector()
        for up in (0, 1):
            t = time.perf_counter()
            n = sum(len(det(g, up)) > 0 for g in grays)
            ms = (time.perf_counter() - t) / len(grays) * 1e3
            print(f"  dlib HOG upsample {up}: {n:2d}  {ms:5.1f} ms/photo")
    cfg = PhotoConfig()
    kinds = [[k for _, _, k in detect_faces(g, cfg)] for g in grays]
    t = time.perf_counter()
    for g in grays:
        detect_faces(g, cfg)
    ms = (time.perf_counter() - t) / len(grays) * 1e3
    one = sum(len(k) == 1 for k in kinds)
    print(
        f"  faceattrs pipeline: exactly one face in {one}, detected box "
        f"{sum(k == ['detected'] for k in kinds)}, whole image {sum(k == ['whole'] for k in kinds)}, "
        f"none {sum(not k for k in kinds)}, >1 {sum(len(k) > 1 for k in kinds)}; {ms:.1f} ms/photo"
    )


def margin_grid(grays, idx, boxes) -> tuple[list, np.ndarray]:
    """Mean-correlation table: rows = (scale, shift x, shift y), columns = photos."""
    grid = [
        (s, dx, dy)
        for s in np.arange(0.85, 1.31, 0.025)
        for dx in (-0.025, 0.0, 0.025)
        for dy in np.arange(-0.05, 0.2001, 0.01)
    ]
    cfg = PhotoConfig()
    scores = np.empty((len(grid), len(boxes)))
    for gi, (s, dx, dy) in enumerate(grid):
        c = replace(cfg, margin_scale=s, margin_shift_x=dx, margin_shift_y=dy)
        for j, (i, b) in enumerate(zip(idx, boxes, strict=True)):
            scores[gi, j] = corr(to_face_crop(grays[i], b, c), whole48(grays[i]))
    return grid, scores


def report_best(label: str, grid, scores) -> None:
    best = scores.mean(1).argmax()
    loo = [scores[np.delete(scores, j, 1).mean(1).argmax(), j] for j in range(scores.shape[1])]
    s, dx, dy = grid[best]
    print(
        f"  {label}: best margin scale {s:.3f}, shift x {dx:+.3f}, shift y {dy:+.3f}: mean r "
        f"{scores[best].mean():.3f} (leave-one-out {np.mean(loo):.3f}, min {scores[best].min():.3f})"
    )


def fit_margin(grays, dlib_path: str | None) -> None:
    print("\n== 2. margin: crop vs whole-photo 48x48, pixel correlation")
    cfg = PhotoConfig()
    boxes, idx = [], []
    for i, g in enumerate(grays):
        found = [f for f in detect_faces(g, cfg) if f[2] == "detected"]
        if found:
            boxes.append(max(found, key=lambda f: f[0][2])[0])
            idx.append(i)
    stats = np.array(
        [(200 / w, (100 - x - w / 2) / w, (100 - y - h / 2) / h) for x, y, w, h in boxes]
    )
    print(
        f"  {len(boxes)} photos with a detected box; image side / box side: median "
        f"{np.median(stats[:, 0]):.3f} (IQR {np.subtract(*np.percentile(stats[:, 0], [75, 25])):.3f}); "
        f"image centre - box centre: x {np.median(stats[:, 1]):+.3f}, y {np.median(stats[:, 2]):+.3f} box sides"
    )
    grid, scores = margin_grid(grays, idx, boxes)
    report_best("faceattrs (Haar alt2)", grid, scores)
    here = (cfg.margin_scale, cfg.margin_shift_x, cfg.margin_shift_y)
    cur = [
        corr(to_face_crop(grays[i], b, cfg), whole48(grays[i]))
        for i, b in zip(idx, boxes, strict=True)
    ]
    bare = [
        corr(to_face_crop(grays[i], b, cfg, margin=False), whole48(grays[i]))
        for i, b in zip(idx, boxes, strict=True)
    ]
    print(
        f"  configured {here}: mean r {np.mean(cur):.3f}; box as-is (no margin): {np.mean(bare):.3f}"
    )
    if dlib_path:
        import dlib

        det = dlib.get_frontal_face_detector()
        found = [(i, det(g, 0)) for i, g in enumerate(grays)]
        found = [(i, r[0]) for i, r in found if len(r)]
        dboxes = [(r.left(), r.top(), r.width(), r.height()) for _, r in found]
        grid, scores = margin_grid(grays, [i for i, _ in found], dboxes)
        report_best(f"dlib HOG ({len(dboxes)} photos)", grid, scores)


def compose(tiles, sizes, rng, canvas=(720, 960)):
    """Paste ``tiles`` resized to ``sizes`` on a smooth random background, spaced out."""
    h, w = canvas
    noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 25)
    bg = cv2.normalize(noise, None, 60, 200, cv2.NORM_MINMAX).astype(np.uint8)
    img = bg.copy()
    placed = []
    for tile, s in zip(tiles, sizes, strict=True):
        for _ in range(200):
            x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            if all(
                x + s * 1.3 < a or a + b * 1.3 < x or y + s * 1.3 < c or c + b * 1.3 < y
                for a, c, b in placed
            ):
                img[y : y + s, x : x + s] = cv2.resize(tile, (s, s), interpolation=cv2.INTER_AREA)
                placed.append((x, y, s))
                break
    return img, placed


def composites(grays, n_scenes: int = 12, seed: int = 0) -> None:
    print("\n== 3. composed multi-face scenes (960x720, faces 64-200 px)")
    rng = np.random.default_rng(seed)
    cfg = PhotoConfig()
    hit = miss = false = 0
    rs, bare, t_total = [], [], 0.0
    for _ in range(n_scenes):
        pick = rng.choice(len(grays), size=6, replace=False)
        sizes = rng.choice([64, 80, 100, 128, 160, 200], size=6)
        img, placed = compose([grays[i] for i in pick], sizes, rng)
        t = time.perf_counter()
        found = detect_faces(img, cfg)
        t_total += time.perf_counter() - t
        used = set()
        for (x, y, s), i in zip(placed, pick, strict=True):
            near = [
                k
                for k, (b, _, _) in enumerate(found)
                if abs(b[0] + b[2] / 2 - x - s / 2) < s / 3
                and abs(b[1] + b[3] / 2 - y - s / 2) < s / 3
            ]
            if near:
                hit += 1
                used.update(near)
                truth = whole48(
                    cv2.resize(grays[i], (int(s), int(s)), interpolation=cv2.INTER_AREA)
                )
                rs.append(corr(to_face_crop(img, found[near[0]][0], cfg), truth))
                bare.append(corr(to_face_crop(img, found[near[0]][0], cfg, margin=False), truth))
            else:
                miss += 1
        false += len(found) - len(used)
    print(
        f"  faces found {hit} of {hit + miss}, false detections {false}, "
        f"crop vs truth mean r {np.mean(rs):.3f} (min {np.min(rs):.3f}; no margin "
        f"{np.mean(bare):.3f}); "
        f"{t_total / n_scenes * 1e3:.0f} ms/scene"
    )


def accuracy(paths, model: str) -> None:
    from faceattrs.predict import FaceAnalyzer

    print("\n== 4. accuracy on the photos (labels from the names AGE_GENDER_ETHNICITY_*)")
    truth = [tuple(int(v) for v in p.name.split("_")[:3]) for p in paths]
    an = FaceAnalyzer(model)
    firsts = {}
    for name, detect in (("photo path (detect + margin crop)", True), ("--no-detect", False)):
        first = {}
        for r in an.analyze(paths, detect=detect, on_error="record"):
            first.setdefault(r["file"], r)  # the first face of each photo
        firsts[name] = first
        g = e = n = 0
        ages = []
        for p, (age, gi, ei) in zip(paths, truth, strict=True):
            r = first[str(p)]
            if "error" in r:
                continue
            n += 1
            g += r["gender"]["label"] == GENDERS[gi]
            e += r["ethnicity"]["label"] == ETHNICITIES[ei]
            if r.get("age"):
                ages.append(abs(r["age"]["value"] - age))
        mae = f", age MAE {np.mean(ages):.1f} y" if ages else ""
        print(f"  {name}: {n} photos, gender {g}/{n}, ethnicity {e}/{n}{mae}")
    a, b = firsts.values()
    same = {
        h: sum(
            a[str(p)][h]["label"] == b[str(p)][h]["label"]
            for p in paths
            if "error" not in a[str(p)]
        )
        for h in ("gender", "ethnicity")
    }
    dp = [
        abs(a[str(p)]["ethnicity"]["probabilities"][k] - b[str(p)]["ethnicity"]["probabilities"][k])
        for p in paths
        if "error" not in a[str(p)]
        for k in ETHNICITIES
    ]
    print(
        f"  photo path vs whole photo (the training crop): same gender label {same['gender']}, "
        f"same ethnicity label {same['ethnicity']}; mean |dp| ethnicity {np.mean(dp):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photos", type=Path)
    ap.add_argument("--model", help="a run folder: also measure accuracy")
    ap.add_argument("--dlib", help="folder holding an unpacked dlib-bin wheel (comparison)")
    args = ap.parse_args()
    if args.dlib:
        sys.path.insert(0, args.dlib)
    paths = sorted(args.photos.glob("*.jpg"))
    grays = [to_gray(load_image(p)) for p in paths]
    cv2.setNumThreads(1)
    detection_rates(grays, args.dlib)
    fit_margin(grays, args.dlib)
    composites(grays)
    if args.model:
        accuracy(paths, args.model)


if __name__ == "__main__":
    main()
