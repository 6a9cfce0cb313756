"""Speed of the PyTorch port of dlib's face-recognition ResNet against dlib itself.

Per face, from one run: dlib's ``compute_face_descriptor`` on one aligned 150x150 chip
(and on a list of ``--batch`` chips, its batched overload), and the port
(:class:`faceattrs.dlib_resnet.DlibFaceResNet`, PyTorch fp32, inference mode) on 1 and 2
threads at batch 1 and at batch ``--batch``. Timings are medians over ``--rounds``
interleaved rounds (a shared VM's speed drifts from one minute to the next); each ratio
is dlib's single-chip time over the port's, both from the same round, and the median
ratio is printed with its range. dlib's CPU time per wall second says how many cores it
kept busy (its build decides that; it cannot be set from Python).

The chips are dlib's own (HOG detector, 5 landmarks, ``get_face_chip`` at padding 0.25)
from the photos in ``--photos``, repeated to fill a batch; speed does not depend on them.

Run: ``PYTHONPATH=src python benchmarks/bench_dlib_port.py --photos ../shared/data/photos``
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import dlib
import numpy as np
import torch
from PIL import Image

from faceattrs.dlib_resnet import DlibFaceResNet, chips_to_input, default_dat_path
from faceattrs.photo.detect import _dlib_model


def dlib_chips(photos: Path) -> list[np.ndarray]:
    detector = dlib.get_frontal_face_detector()
    shapes = dlib.shape_predictor(_dlib_model("shape_predictor_5_face_landmarks.dat"))
    chips = []
    for path in sorted(photos.glob("*.jpg")):
        img = np.asarray(Image.open(path).convert("RGB"))
        for rect in detector(img, 0):
            chips.append(dlib.get_face_chip(img, shapes(img, rect), size=150, padding=0.25))
    if not chips:
        raise SystemExit(f"no face found in {photos}")
    return chips


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds of ``fn()`` over ``repeats`` calls (after one warm-up), and the
    process's CPU seconds per wall second over them."""
    fn()
    walls, cpu0, wall0 = [], time.process_time(), time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
    cores = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return statistics.median(walls), cores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=Path, default=Path("../shared/data/photos"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=8, help="calls per timing (batch 1)")
    args = ap.parse_args()

    chips = dlib_chips(args.photos)
    batch = [chips[i % len(chips)] for i in range(args.batch)]
    rec = dlib.face_recognition_model_v1(str(default_dat_path()))
    model = DlibFaceResNet.from_dat()
    x1, xb = chips_to_input(batch[0]), chips_to_input(np.stack(batch))

    def port(x):
        with torch.inference_mode():
            model(x)

    rows: dict[str, list[tuple[float, float]]] = {}

    def record(name: str, per_face: float, cores: float) -> None:
        rows.setdefault(name, []).append((per_face, cores))

    big = max(2, args.repeats // 4)  # calls per timing at --batch
    for _ in range(args.rounds):
        s, c = timed(lambda: rec.compute_face_descriptor(batch[0]), args.repeats)
        record("dlib, one chip", s, c)
        s, c = timed(lambda: rec.compute_face_descriptor(batch), big)
        record(f"dlib, list of {args.batch}", s / args.batch, c)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            s, c = timed(lambda: port(x1), args.repeats)
            record(f"port fp32, {threads} thread(s), batch 1", s, c)
            s, c = timed(lambda: port(xb), big)
            record(f"port fp32, {threads} thread(s), batch {args.batch}", s / args.batch, c)

    base = [t for t, _ in rows["dlib, one chip"]]
    print(f"{len(chips)} chips from {args.photos}; {args.rounds} rounds; torch {torch.__version__}")
    print(f"{'':40s} {'ms/face':>8s} {'cores':>6s} {'dlib one chip / this':>22s}")
    for name, vals in rows.items():
        ms = 1000 * statistics.median(t for t, _ in vals)
        cores = statistics.median(c for _, c in vals)
        ratios = sorted(b / t for b, (t, _) in zip(base, vals, strict=True))
        spread = f"{statistics.median(ratios):.1f}x ({ratios[0]:.1f}-{ratios[-1]:.1f})"
        print(f"{name:40s} {ms:8.1f} {cores:6.2f} {spread:>22s}")


if __name__ == "__main__":
    main()
