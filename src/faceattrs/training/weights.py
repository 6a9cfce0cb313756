"""Where a run's weights start, which of them train and what it serves: :func:`load_init`
(the weights of another network: a run folder, an ensemble's member, the bundled model, or
dlib's), :func:`freeze_backbone` and :class:`FrozenBackbone` (``freeze=backbone``: only
the heads train; :func:`backbone_features` computes what they take once) and
:func:`make_ema` (a moving average of the weights, evaluated and saved in their place).

The network splits where :class:`faceattrs.model.HeadsNet` does: its ``heads`` (one
:class:`faceattrs.model.Head` per task on the embedding, ``forward_head``) and everything
else, the backbone (``embed``: faces -> embedding), for every arch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..bundle import resolve
from ..dlib_resnet import default_dat_path, load_dlib_weights
from ..exceptions import FaceattrsError
from ..model import FaceEnsemble, FaceResNet, HeadsNet
from ..prepare import file_sha256
from .config import TrainError
from .loop import autocast

HEADS_ATTR = "heads"  # HeadsNet's ModuleDict of heads: what trains when the backbone is frozen


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


def freeze_backbone(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Fix ``model``'s backbone: every parameter outside ``model.heads`` gets
    ``requires_grad`` False. Returns the heads' parameters, the only ones to give the
    optimiser (so weight decay never reaches the backbone either)."""
    if not isinstance(model, HeadsNet):
        raise TrainError(f"freeze=backbone needs one network with heads on a backbone (arch "
                         f"resnet or dlib_resnet), not a {type(model).__name__}")  # fmt: skip
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(f"{HEADS_ATTR}."))
    return [p for p in model.parameters() if p.requires_grad]


class FrozenBackbone(torch.nn.Module):
    """``net`` (a :class:`HeadsNet` after :func:`freeze_backbone`) as a ``freeze=backbone``
    run (and the age heads' head-only first stage, ``age.finetune``) trains it: ``train()``
    puts only the heads in training mode (their dropout), the backbone stays in eval mode
    (its BatchNorm statistics, and any dropout of its own, unchanged). With ``features`` the input is the backbone's features
    (:func:`backbone_features`, computed once) and ``forward`` runs the heads alone;
    without, the whole network runs and the backward pass reaches only the heads.
    ``net`` itself is what a checkpoint saves."""

    def __init__(self, net: HeadsNet, features: bool = False):
        super().__init__()
        self.net, self.features = net, features

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        for name, child in self.net.named_children():
            if name != HEADS_ATTR:
                child.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net.forward_head(x) if self.features else self.net(x)


@torch.no_grad()
def backbone_features(
    net: HeadsNet,
    data: Mapping[str, torch.Tensor],
    prepare: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    batch_size: int,
    bf16: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """``net.embed`` of every face of ``data`` (``(N, D)``, in the dtype the run's autocast
    gives it: what the heads take), the network in eval mode, ``batch_size`` faces at a
    time. ``prepare(batch)`` turns a batch into the network's input as the training loop
    would (the augmenter, switched off, for the training faces; validation's uint8 faces
    as they are), so the heads see what the whole network's forward would give them."""
    net.eval()
    device = data["image"].device
    out = []
    for start in range(0, len(data["image"]), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items()}
        x = prepare(batch)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
            out.append(net.embed(x))
    return torch.cat(out)
