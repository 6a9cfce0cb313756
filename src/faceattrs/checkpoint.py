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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import config as cfgmod
from .exceptions import FaceattrsError
from .inputs import class_names
from .io import write_json_atomic, write_with
from .model import FaceResNet, ModelConfig, build_model


class CheckpointError(FaceattrsError):
    """A model folder or checkpoint that is missing or inconsistent."""


FORMAT = "faceattrs-checkpoint-1"


def check_meta(meta: dict[str, Any], where: Path) -> None:
    """The settings this code cannot honour: another checkpoint format, or input settings
    (``image_size``, ``normalisation``) that contradict the model's own input contract
    (every checkpoint written so far carries them; older ones lack ``input``, i.e. 48x48
    grayscale in [-1, 1])."""
    fmt = meta.get("format", FORMAT)
    if fmt != FORMAT:
        raise CheckpointError(
            f"{where}: checkpoint format {fmt!r}, but this faceattrs reads {FORMAT!r} "
            "(written by another version?)"
        )
    try:
        spec = cfgmod.from_dict(ModelConfig, meta.get("model") or {}).input
    except (TypeError, ValueError, cfgmod.ConfigError) as e:
        raise CheckpointError(f"{where}: bad or missing model settings: {e}") from None
    if meta.get("image_size", spec.size) != spec.size:
        raise CheckpointError(
            f"{where}: made for {meta['image_size']}-pixel faces, but its model takes "
            f"{spec.describe()} faces"
        )
    norm = meta.get("normalisation", _normalisation(spec))
    if not isinstance(norm, dict) or norm != _normalisation(spec):
        raise CheckpointError(
            f"{where}: input normalisation {norm!r}, but its model normalises with "
            f"{_normalisation(spec)}"
        )


def _normalisation(spec) -> dict[str, Any]:
    """``{"mean", "std"}`` as checkpoints record it: a number when one value serves every
    channel (as every checkpoint before input contracts), else a list per channel."""
    return {k: v[0] if len(v) == 1 else list(v) for k, v in (("mean", spec.mean),
                                                              ("std", spec.std))}  # fmt: skip


def base_meta(model: FaceResNet) -> dict[str, Any]:
    """The settings every checkpoint of ``model`` carries."""
    spec = model.cfg.input
    return {
        "format": FORMAT,
        "model": cfgmod.to_dict(model.cfg),
        "image_size": spec.size,
        "normalisation": _normalisation(spec),
        "input": spec.to_dict(),
        "class_names": class_names(model.cfg.heads),
        "cam_layer": model.cam_layer,
    }


def save_checkpoint(
    run_dir: str | Path,
    name: str,
    model: torch.nn.Module,
    meta: dict,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``NAME.safetensors`` then ``NAME.json`` (the JSON last: it marks completeness).
    ``dtype`` (e.g. ``torch.float16``): the floating tensors are stored in it (loading
    casts them back to the model's own dtype)."""
    run_dir = Path(run_dir)
    inner = getattr(model, "module", model)  # unwrap DDP / compiled models
    inner = getattr(inner, "_orig_mod", inner)
    state = {k: v.detach().to("cpu").contiguous() for k, v in inner.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        meta = {**meta, "weights_dtype": str(dtype).removeprefix("torch.")}
    write_with(run_dir / f"{name}.safetensors", lambda p: save_file(state, str(p)))
    full = {**base_meta(inner), **meta}
    write_json_atomic(run_dir / f"{name}.json", full)
    return run_dir / f"{name}.json"


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint settings not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint settings are not valid JSON: {path}: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"checkpoint settings are not a JSON object: {path} holds a {type(meta).__name__}"
        )
    return meta


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (on the CPU); a missing, truncated or foreign file is a
    :class:`CheckpointError` naming it."""
    return _read_weights(path, lambda p: load_file(p, device="cpu"))


def check_weights(path: str | Path) -> None:
    """The same errors as :func:`load_weights`, from the file's header alone (cheap)."""
    _read_weights(path, lambda p: safe_open(p, framework="pt").keys())


def _read_weights(path: str | Path, read):
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights missing: {path}")
    try:
        return read(str(path))
    except Exception as e:  # safetensors raises its own error type for every bad file
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated or damaged: "
            "copy it again or retrain"
        ) from None


def resolve_checkpoint(path: str | Path, name: str = "best") -> Path:
    """A folder holding checkpoint ``name``, or a ``.json`` / ``.safetensors`` file -> the
    checkpoint's JSON path. (``--model`` values are resolved by :mod:`faceattrs.bundle`.)"""
    path = Path(path)
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
    check_meta(meta, meta_path)
    weights = meta_path.with_suffix(".safetensors")
    if not weights.exists():
        raise CheckpointError(f"weights missing next to {meta_path}: {weights}")
    try:
        mcfg = cfgmod.from_dict(ModelConfig, meta["model"])
    except (KeyError, TypeError, cfgmod.ConfigError) as e:
        raise CheckpointError(f"{meta_path}: bad or missing model settings: {e}") from None
    try:
        model = build_model(mcfg)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{meta_path}: bad model settings: {e}") from None
    state = load_weights(weights)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensor shapes that differ from the settings
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{weights} does not match its settings ({first})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its settings: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.to(device).eval(), meta
