"""Where a run's weights start and what it serves: :func:`load_init` (the weights of
another network: a run folder, an ensemble's member, the bundled model, or dlib's) and
:func:`make_ema` (a moving average of the weights, evaluated and saved in their place)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..bundle import resolve
from ..dlib_resnet import default_dat_path, load_dlib_weights
from ..exceptions import FaceattrsError
from ..model import FaceEnsemble, FaceResNet
from ..prepare import file_sha256
from .config import TrainError


def make_ema(model: torch.nn.Module, decay: float):
    """An exponential moving average of ``model``'s weights and BatchNorm statistics
    (``torch.optim.swa_utils.AveragedModel``; ``update_parameters(model)`` after each
    step), or None when ``decay`` is 0."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def load_init(model: FaceResNet, source: str, member: int = 0) -> dict[str, Any]:
    """Copy the weights of ``source`` (``init``: a run folder, an ensemble, "default";
    "dlib": dlib's face-recognition weights into a ``dlib_resnet`` backbone) into
    ``model``, which must have the same design; returns what ``config.json`` records of it."""
    if source == "dlib":
        if model.cfg.arch != "dlib_resnet":
            raise TrainError("init=dlib needs arch=dlib_resnet (the dlib preset)")
        path = default_dat_path()
        model.backbone.load_state_dict(load_dlib_weights(path))
        return {"source": f"dlib:{path.name}", "weights_sha256": file_sha256(path)}

    try:
        bundle = resolve(None if source == "default" else source)
        net, _ = bundle.load_multitask()
    except (FaceattrsError, OSError) as e:
        raise TrainError(f"init {source}: {e}") from None
    nets = list(net.members) if isinstance(net, FaceEnsemble) else [net]
    if member >= len(nets):
        raise TrainError(
            f"init_member={member}, but {source} holds {len(nets)} network(s) (0-{len(nets) - 1})"
        )
    net = nets[member]
    if net.cfg.input != model.cfg.input or net.cfg.stem_stride != model.cfg.stem_stride:
        raise TrainError(
            f"init {source} takes {net.cfg.input.describe()} faces (stem stride "
            f"{net.cfg.stem_stride}); these settings: {model.cfg.input.describe()} (stem stride "
            f"{model.cfg.stem_stride})"
        )
    if net.cfg.width != model.cfg.width or dict(net.cfg.heads) != dict(model.cfg.heads):
        raise TrainError(
            f"init {source} is a network of width {net.cfg.width} with heads "
            f"{', '.join(net.cfg.heads)}; these settings give width {model.cfg.width} with heads "
            f"{', '.join(model.cfg.heads)} (set width= and age_head= to match)"
        )
    try:
        model.load_state_dict(net.state_dict())
    except RuntimeError as e:  # same width and heads, other blocks
        raise TrainError(
            f"init {source} does not fit these settings: {str(e).splitlines()[0]}"
        ) from None
    weights = bundle.checkpoint.with_suffix(".safetensors")
    return {"source": str(bundle.path), "member": member, "weights_sha256": file_sha256(weights)}
