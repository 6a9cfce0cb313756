"""Join trained networks of one design into one model: their logits averaged per head.

``faceattrs ensemble RUN1 RUN2 ... --out RUN`` loads each run's best network (same width,
depth, heads and class names; a network with its own age head keeps it, and the ages
are averaged too), and writes ``RUN/best.{safetensors,json}`` (a
:class:`~faceattrs.model.FaceEnsemble`; its members' epochs, scores and weight hashes in
``best.json["members"]``) and ``RUN/config.json`` (the members' data). The result is a
run folder like any other: ``faceattrs calibrate --model RUN`` next (temperatures, flip
TTA, the age head's interval), then evaluate, predict, explain, export.

Ensembling costs one network's compute per member: two width-0.25 networks cost what
one width-0.25 multitask network plus the two-stage age model's network cost.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from .bundle import RUN_CONFIG, resolve
from .checkpoint import save_checkpoint
from .exceptions import FaceattrsError
from .io import atomic_folder, write_json_atomic
from .model import FaceEnsemble
from .run_folder import weights_id

log = logging.getLogger(__name__)

# checkpoint facts that must agree between members
SAME = ("class_names", "image_size", "normalisation", "age_edges")


def build_ensemble(runs: list, out: str | Path, fp16: bool = False) -> Path:
    """Write the ensemble of ``runs`` (run folders or checkpoints) to the new folder ``out``;
    returns its ``best.json``. ``fp16``: store the weights in half precision (half the
    file; they run in fp32 once loaded)."""
    if len(runs) < 2:
        raise FaceattrsError(f"an ensemble needs 2 or more runs, got {len(runs)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FaceattrsError(f"{out} exists and is not empty; choose a new --out folder")
    bundles = [resolve(r) for r in runs]
    for b in bundles:
        if b.kind == "onnx":
            raise FaceattrsError(f"{b.path} is an ONNX export: pass its run folder")
    nets = [b.load_multitask()[0] for b in bundles]
    for b, net in zip(bundles, nets, strict=True):
        if net.cfg.members != 1:
            raise FaceattrsError(f"{b.path}: already an ensemble; pass its member runs")
    first, cfg = bundles[0], nets[0].cfg
    for b, net in zip(bundles[1:], nets[1:], strict=True):
        if net.cfg != cfg:
            raise FaceattrsError(
                f"{b.path}: another design than {first.path} ({net.cfg} vs {cfg}); "
                "members need the same width, depth and heads"
            )
        for key in SAME:
            if b.meta.get(key) != first.meta.get(key):
                raise FaceattrsError(f"{b.path}: its {key} differ from {first.path}'s")
    model = FaceEnsemble(replace(cfg, members=len(nets))).eval()
    for member, net in zip(model.members, nets, strict=True):
        member.load_state_dict(net.state_dict())
    members = [
        {
            "run": str(b.source),  # as given: no path of this machine in a shipped model
            "epoch": b.meta.get("epoch"),
            "score": b.meta.get("score"),
            "weights_sha256": weights_id(b.source) if b.run_dir else None,
        }
        for b in bundles
    ]
    data, keys = [], []
    for b in bundles:
        try:
            data.append(str(b.recorded_data()))
        except FaceattrsError:
            data.append(None)
        keys.append(b.recorded_data_key())
    # the same data: the same content key where the runs know it, else the same path
    same = [k if k else f"path {d}" for k, d in zip(keys, data, strict=True)]
    if len(set(same)) > 1:
        raise FaceattrsError(
            "the runs were trained on different data: "
            + "; ".join(f"{b.path}: {s}" for b, s in zip(bundles, same, strict=True))
        )
    here = [d for d in data if d and Path(d).exists()]  # a path of this machine, if any
    config = {"data": (here or data)[0], "data_key": keys[0], "ensemble_of": members}
    extra = {k: first.meta[k] for k in SAME if k in first.meta}
    dtype = torch.float16 if fp16 else None
    with atomic_folder(out) as stage:  # a kill leaves no folder, never a half-written one
        write_json_atomic(stage / RUN_CONFIG, config)
        save_checkpoint(stage, "best", model, {**extra, "members": members}, dtype=dtype)
    log.info("ensemble of %d runs -> %s; next: faceattrs calibrate --model %s", len(nets), out, out)
    return out / "best.json"
