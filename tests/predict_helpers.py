"""Helpers of the prediction tests (tests/test_predict_api.py, test_predict_cli.py,
test_photo_workers.py) and of the other tests that need a model folder: ``make_run``, a tiny
random-init bundle, and ``compose``, photos pasted side by side. The session fixtures
``run_dir``, ``photos`` and ``image_files`` they share are in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from faceattrs.checkpoint import save_checkpoint
from faceattrs.model import FaceResNet, ModelConfig
from faceattrs.photo import load_image

EDGES = np.array([16, 26, 29, 37, 53])


def make_run(run_dir: Path, age: bool = True, temperatures: dict | None = None) -> Path:
    """A tiny random-init bundle: multitask model, optionally an age model and calibration."""
    torch.manual_seed(0)
    save_checkpoint(
        run_dir, "best", FaceResNet(ModelConfig(width=0.125)), {"epoch": 0, "score": 0.0}
    )
    if temperatures:
        (run_dir / "calibration.json").write_text(json.dumps({"temperatures": temperatures}))
    if age:
        from faceattrs.age import AgeModel, save_age_model
        from faceattrs.age.direct import HEAD
        from faceattrs.age.regress import BinRegressors

        coarse = FaceResNet(ModelConfig(width=0.125, heads={"age_bin": 6})).eval()
        reg = BinRegressors(coarse.embed_dim, 6, 16).eval()
        with torch.no_grad():
            reg.center.copy_(torch.tensor([8.0, 21, 27, 33, 45, 65]))
            reg.scale.fill_(5.0)
        direct = FaceResNet(ModelConfig(width=0.125, heads={HEAD: 101})).eval()
        # a 90 % interval of different half-widths per bin, as calibration fits one
        interval = {"method": "test", "alpha": 0.1, "global": 9.0,
                    "per_bin": [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]}  # fmt: skip
        model = AgeModel(coarse=coarse, regressors=reg, edges=EDGES, direct=direct)
        model.interval = interval
        save_age_model(run_dir / "age", model, run_dir, {})
    return run_dir


def compose(paths, size=(500, 900)) -> np.ndarray:
    """Photos shrunk to 150 px and pasted in a row on a grey background."""
    img = np.full((*size, 3), 128, np.uint8)
    for i, p in enumerate(paths):
        x = 40 + i * 210
        img[150:300, x : x + 150] = cv2.resize(
            load_image(p), (150, 150), interpolation=cv2.INTER_AREA
        )
    return img
