"""Trial (not committed): the dlib port's 128-d descriptors for every UTKFace chip.

Per chip: dlib's HOG detector (no upsampling) on the 200x200 chip; the detection nearest
the centre, else (a miss) a fallback box = the median of the detected boxes; 5 landmarks
in that box; dlib.get_face_chip(size=150, padding=0.25); the port's descriptor (batches
of 64, one torch thread). Writes local/descriptors.npz: names, descriptor (N,128) float32,
detected (N,) bool, box (N,4) left/top/right/bottom, landmarks (N,5,2).

Run: nohup env PYTHONPATH=src python local/utk_descriptors.py > local/descriptors.log 2>&1 &
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import dlib
import numpy as np
import torch
from PIL import Image

from faceattrs.dlib_resnet import DlibFaceResNet, chips_to_input
from faceattrs.photo import _dlib_model

torch.set_num_threads(1)
CHIPS = Path("/work/shared/data/utkface_chips")
OUT = Path(__file__).resolve().parent / "descriptors.npz"


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def main() -> None:
    t0 = time.time()
    names = sorted(os.listdir(CHIPS))[: int(os.environ.get("LIMIT", 0)) or None]
    n = len(names)
    detector = dlib.get_frontal_face_detector()
    shapes = dlib.shape_predictor(_dlib_model("shape_predictor_5_face_landmarks.dat"))
    model = DlibFaceResNet.from_dat()

    # pass 1: detection
    boxes = np.zeros((n, 4), np.int32)
    detected = np.zeros(n, bool)
    for i, name in enumerate(names):
        img = np.asarray(Image.open(CHIPS / name).convert("RGB"))
        rects = detector(img, 0)
        if len(rects):
            cy, cx = img.shape[0] / 2, img.shape[1] / 2
            r = min(rects, key=lambda r: (r.center().x - cx) ** 2 + (r.center().y - cy) ** 2)
            boxes[i] = r.left(), r.top(), r.right(), r.bottom()
            detected[i] = True
        if (i + 1) % 2000 == 0:
            log(f"detect {i + 1}/{n}: {detected[: i + 1].sum()} found")
    fallback = np.round(np.median(boxes[detected], axis=0)).astype(np.int32)
    boxes[~detected] = fallback
    log(f"detection done: {detected.sum()}/{n} found, {n - detected.sum()} missed; "
        f"fallback box {fallback.tolist()} ({time.time() - t0:.0f} s)")

    # pass 2: landmarks, dlib chips, descriptors
    desc = np.zeros((n, 128), np.float32)
    marks = np.zeros((n, 5, 2), np.float32)
    batch, idx = [], []

    def flush():
        with torch.inference_mode():
            desc[idx] = model(chips_to_input(np.stack(batch))).numpy()
        batch.clear(), idx.clear()

    for i, name in enumerate(names):
        img = np.asarray(Image.open(CHIPS / name).convert("RGB"))
        shape = shapes(img, dlib.rectangle(*map(int, boxes[i])))
        marks[i] = [(p.x, p.y) for p in shape.parts()]
        batch.append(dlib.get_face_chip(img, shape, size=150, padding=0.25))
        idx.append(i)
        if len(batch) == 64:
            flush()
        if (i + 1) % 2000 == 0:
            log(f"describe {i + 1}/{n} ({time.time() - t0:.0f} s)")
    if batch:
        flush()
    tmp = OUT.with_suffix(".tmp.npz")
    np.savez(tmp, names=np.array(names), descriptor=desc, detected=detected, box=boxes,
             landmarks=marks)
    os.replace(tmp, OUT)
    log(f"wrote {OUT}: {n} chips, {n - detected.sum()} missed detection, "
        f"{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main())
