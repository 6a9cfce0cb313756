"""Self-describing checkpoints: weights in safetensors, everything else in JSON.

A checkpoint ``NAME`` in a run folder is two files, written atomically:
``NAME.safetensors`` (the state dict) and ``NAME.json`` (model settings, input size,
normalisation, class names, epoch, score, the run's config and anything else the stage
adds, e.g. age-bin edges or a calibration temperature). Loading rebuilds the model from
the JSON and never unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import config as cfgmod
from .exceptions import FaceattrsError
from .io import write_json_atomic, write_with
from .labels import ETHNICITIES, GENDERS, IMAGE_SIZE
from .model import FaceResNet, ModelConfig

# pixels / 255 in [0, 1] -> (x - mean) / std in [-1, 1]
NORMALISATION = {"mean": 0.5, "std": 0.5}
CLASS_NAMES = {"gender": list(GENDERS), "ethnicity": list(ETHNICITIES)}


class CheckpointError(FaceattrsError):
    """A model folder or checkpoint that is missing or inconsistent."""


def base_meta(model: FaceResNet) -> dict[str, Any]:
    """The settings every checkpoint of ``model`` carries."""
    return {
        "format": "faceattrs-checkpoint-1",
        "model": cfgmod.to_dict(model.cfg),
        "image_size": IMAGE_SIZE,
        "normalisation": dict(NORMALISATION),
        "class_names": {
            k: CLASS_NAMES.get(k, [str(i) for i in range(n)]) for k, n in model.cfg.heads.items()
        },
        "cam_layer": model.cam_layer,
    }


def save_checkpoint(run_dir: str | Path, name: str, model: torch.nn.Module, meta: dict) -> Path:
    """Write ``NAME.safetensors`` then ``NAME.json`` (the JSON last: it marks completeness)."""
    run_dir = Path(run_dir)
    inner = getattr(model, "module", model)  # unwrap DDP / compiled models
    inner = getattr(inner, "_orig_mod", inner)
    state = {k: v.detach().to("cpu").contiguous() for k, v in inner.state_dict().items()}
    write_with(run_dir / f"{name}.safetensors", lambda p: save_file(state, str(p)))
    full = {**base_meta(inner), **meta}
    write_json_atomic(run_dir / f"{name}.json", full)
    return run_dir / f"{name}.json"


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint settings not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint settings are not valid JSON: {path}: {e}") from None


def multitask_dir(path: str | Path) -> Path:
    """The multitask run of a model bundle: ``path`` itself, or for an age run folder
    (``age.json``, from ``faceattrs train-age``) the multitask run it refers to."""
    path = Path(path)
    if path.is_dir() and not (path / "best.json").exists() and (path / "age.json").exists():
        from .age.bundle import resolve_bundle  # late: the age package imports this module

        return resolve_bundle(path)[0]
    return path


def resolve_checkpoint(path: str | Path, name: str = "best") -> Path:
    """A run folder (multitask or age run), or a ``.json`` / ``.safetensors`` file ->
    the checkpoint's JSON path."""
    path = Path(path)
    if path.is_dir() and name == "best":
        path = multitask_dir(path)
    if path.is_dir():
        path = path / f"{name}.json"
    elif path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.exists():
        raise CheckpointError(
            f"no checkpoint at {path}: pass a run folder written by `faceattrs train` "
            "(it holds best.json + best.safetensors)"
        )
    return path


def load_model(path: str | Path, name: str = "best", device: str | torch.device = "cpu"):
    """Rebuild the model described by a checkpoint and load its weights.

    Returns ``(model in eval mode, meta dict)``.
    """
    meta_path = resolve_checkpoint(path, name)
    meta = read_meta(meta_path)
    weights = meta_path.with_suffix(".safetensors")
    if not weights.exists():
        raise CheckpointError(f"weights missing next to {meta_path}: {weights}")
    try:
        mcfg = cfgmod.from_dict(ModelConfig, meta["model"])
    except (KeyError, cfgmod.ConfigError) as e:
        raise CheckpointError(f"{meta_path}: bad or missing model settings: {e}") from None
    model = FaceResNet(mcfg)
    state = load_file(str(weights), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its settings: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.to(device).eval(), meta
