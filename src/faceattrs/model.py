"""The reference's modified ResNet-18 for 48x48 grayscale faces, with named task heads.

A network carries its input contract (``cfg.input``, an :class:`InputSpec`: by default
the reference's 48x48 grayscale) and takes either the uint8 faces of that contract
(``(B, S, S)`` gray, ``(B, S, S, 3)`` RGB: normalised inside the network, as in the ONNX
graph) or float ``(B, C, S, S)`` already normalised (what augmentation gives in
training). ``forward`` returns a dict of logits per head; ``embed`` returns the shared
embedding ``(B, 512 * width)``. ``ModelConfig.arch`` names the backbone
(:data:`ARCHS`: one entry per backbone, so a new one plugs in there).
``cam_layer`` names the module Grad-CAM should hook (the last residual stage).
:class:`FaceEnsemble` averages the logits of several such networks (``members`` in
:class:`ModelConfig`); :func:`build_model` makes either from its settings.

>>> import torch
>>> m = FaceResNet(ModelConfig(width=0.125)).eval()
>>> out = m(torch.zeros(2, 1, 48, 48))
>>> {k: tuple(v.shape) for k, v in out.items()}
{'gender': (2, 2), 'ethnicity': (2, 5)}
>>> tuple(m.embed(torch.zeros(2, 1, 48, 48)).shape)
(2, 64)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .dlib_resnet import INPUT as DLIB_INPUT
from .dlib_resnet import DlibFaceResNet
from .inputs import DEFAULT_HEADS, InputSpec


@dataclass
class ModelConfig:
    arch: str = "resnet"  # backbone, a key of ARCHS
    width: float = 1.0  # channel multiplier: 1.0 = 64/128/256/512 (the reference)
    # --- the input contract (``input``): older checkpoints lack these, i.e. 48x48 gray
    image_size: int = 48  # faces are image_size x image_size pixels
    in_channels: int = 1  # 1 = grayscale, 3 = RGB
    mean: tuple[float, ...] = (0.5,)  # normalisation inside the network, pixels / 255 scale
    std: tuple[float, ...] = (0.5,)
    crop: str = "utkface"  # the face's framing the photo path cuts (inputs.CROPS)
    stem_stride: int = 1  # 1 = the reference (48 px); 2 halves the maps at once (96-128 px)
    dropout: float = 0.35  # before each head, after LayerNorm
    blocks: tuple[int, ...] = (2, 2, 2, 2)  # BasicBlocks per stage (ResNet-18)
    # head name -> number of classes; default: gender (2) and ethnicity (5)
    heads: dict[str, int] = field(
        default_factory=lambda: {h: len(c) for h, c in DEFAULT_HEADS.items()}
    )
    members: int = 1  # > 1: an ensemble of that many networks of these settings

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; known: {', '.join(sorted(ARCHS))}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride!r}")
        _ = self.input  # checks the input settings (ValueError)

    @property
    def input(self) -> InputSpec:
        """The faces this network takes."""
        return InputSpec(self.image_size, self.in_channels, self.mean, self.std, self.crop)


def input_settings(spec: InputSpec) -> dict:
    """:class:`ModelConfig` fields for ``spec`` (``ModelConfig(**input_settings(s), ...)``)."""
    return {"image_size": spec.size, "in_channels": spec.channels, "mean": spec.mean,
            "std": spec.std, "crop": spec.crop}  # fmt: skip


class StridedPointwise(nn.Conv2d):
    """A 1x1 convolution with a stride, computed as subsample-then-1x1 (same result, same
    parameters and state-dict keys as ``nn.Conv2d(cin, cout, 1, stride)``).

    Why: in PyTorch 2.13's CPU build the weight gradient of a 1x1 stride-2 channels-last
    fp32 convolution from 8 to 16 channels on 48x48 maps (the width-0.125 model's first
    projection shortcut) crashes the process with a segfault inside oneDNN on AVX-512 CPUs
    (measured on the development machine, 2026-11-29; bf16 and other shapes are fine).

    >>> conv = nn.Conv2d(8, 16, 1, 2, bias=False)
    >>> same = StridedPointwise(8, 16, 1, 2, bias=False)
    >>> _ = same.load_state_dict(conv.state_dict())
    >>> x = torch.randn(2, 8, 47, 48)
    >>> bool(torch.allclose(same(x), conv(x), atol=1e-6))
    True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        return nn.functional.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias)


class BasicBlock(nn.Module):
    """2 x (conv3x3 + BN) with ReLU, skip with a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                StridedPointwise(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Head(nn.Module):
    """LayerNorm + Dropout + Linear on the shared embedding."""

    def __init__(self, dim: int, classes: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(z)))


class HeadsNet(nn.Module):
    """What every backbone shares: one :class:`Head` per task on the embedding
    (``self.heads``), ``forward`` (logits per head) and ``logits_and_embedding`` with flip
    test-time augmentation. A backbone subclass defines ``embed`` (faces -> ``(B, D)``),
    ``forward_features``, ``cam_layer``, ``embed_dim`` and ``input``.

    ``flip_tta``: in eval mode, each head's logits are the mean of the logits of the face
    and of its mirror image (flip test-time augmentation). Off by default and never used in
    training; ``faceattrs calibrate`` turns it on for a run when it raises the validation
    score, and :meth:`faceattrs.bundle.Bundle.load_multitask` applies that choice.
    """

    flip_tta = False

    def forward_head(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(z) for name, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.logits_and_embedding(x)[0]

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits per head (flip-averaged when ``flip_tta`` in eval mode) and the embedding
        of ``x`` itself."""
        x = prepare_input(self, x)  # before the mirror: an RGB face's last axis is colour
        if not (self.flip_tta and not self.training):
            z = self.embed(x)
            return self.forward_head(z), z
        # one batch of faces and mirror images: faster than two passes for small batches
        both = self.embed(torch.cat([x, torch.flip(x, dims=(-1,))]))
        z, z_mirror = both.chunk(2)
        out, mirrored = self.forward_head(z), self.forward_head(z_mirror)
        return {k: (v + mirrored[k]) / 2 for k, v in out.items()}, z


class FaceResNet(HeadsNet):
    """Backbone (stem + 4 stages + global average pool) and one :class:`Head` per task
    (arch ``resnet``: the reference's, at any width and depth)."""

    cam_layer = "stages.3"  # last residual stage, 6x6 maps at 48x48 input

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        self.input = cfg.input
        chans = [max(8, round(c * cfg.width)) for c in (64, 128, 256, 512)]
        # 3x3 stride-1 stem and no max-pool: 48x48 faces are too small to downsample early;
        # stride 2 for larger faces (96 px: the same maps, so about the same cost)
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, chans[0], 3, cfg.stem_stride, 1, bias=False),
            nn.BatchNorm2d(chans[0]),
            nn.ReLU(inplace=True),
        )
        stages, cin = [], chans[0]
        for i, (cout, n) in enumerate(zip(chans, cfg.blocks, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = cin
        self.heads = nn.ModuleDict(
            {name: Head(cin, k, cfg.dropout) for name, k in cfg.heads.items()}
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                # He normal, Var(w) = 2 / fan_in, as the reference specifies.
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for head in self.heads.values():
            # Small output layers: He init gives logits of std ~1 and an initial loss far
            # above log(K); std 0.01 starts at log(K) and still passes gradient back.
            nn.init.normal_(head.fc.weight, std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Faces (uint8 of ``self.input``, or float ``(B, C, S, S)`` normalised) -> feature
        maps ``(B, D, S/8, S/8)`` (``S/16`` with a stride-2 stem)."""
        return self.stages(self.stem(prepare_input(self, x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 48, 48)`` -> embedding ``(B, D)``, D = 512 at full width."""
        return self.pool(self.forward_features(x)).flatten(1)


class FaceEnsemble(nn.Module):
    """``cfg.members`` networks of one design (:class:`FaceResNet`, same heads) whose
    logits are averaged per head; trained apart, joined by ``faceattrs ensemble``.

    It answers as one network: ``forward`` (logits per head), ``logits_and_embedding``
    (the embedding is the members' embeddings side by side), ``flip_tta`` (face and
    mirror in one batch through every member), ``cam_layers`` (each member's last stage:
    Grad-CAM sums the maps of the ensemble's logit over them).

    >>> e = FaceEnsemble(ModelConfig(width=0.125, members=2)).eval()
    >>> x = torch.randn(3, 1, 48, 48)
    >>> mean = (e.members[0](x)["gender"] + e.members[1](x)["gender"]) / 2
    >>> bool(torch.allclose(e(x)["gender"], mean, atol=1e-6)), e.embed_dim
    (True, 128)
    """

    flip_tta = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.members < 2:
            raise ValueError(f"an ensemble needs 2 or more members, got {cfg.members}")
        self.cfg = cfg
        self.input = cfg.input
        one = replace(cfg, members=1)
        self.members = nn.ModuleList(ARCHS[cfg.arch](one) for _ in range(cfg.members))
        self.embed_dim = sum(m.embed_dim for m in self.members)
        self.cam_layers = [f"members.{i}.{FaceResNet.cam_layer}" for i in range(cfg.members)]
        self.cam_layer = f"members.*.{FaceResNet.cam_layer}"

    @property
    def heads(self) -> nn.ModuleDict:
        return self.members[0].heads

    def forward(self, x: torch.Tensor, member_map=map) -> dict[str, torch.Tensor]:
        return self.logits_and_embedding(x, member_map)[0]

    def logits_and_embedding(
        self, x: torch.Tensor, member_map=map
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``member_map(fn, members)`` runs the members (builtin ``map``: one after the
        other; a thread pool's ``map`` runs them at once, as the analyzer does for one face)."""
        flip = self.flip_tta and not self.training
        x = prepare_input(self, x)  # once for all members
        inp = torch.cat([x, torch.flip(x, dims=(-1,))]) if flip else x

        def run(m):
            z = m.embed(inp)
            return m.forward_head(z), z

        outs, zs = zip(*member_map(run, self.members), strict=True)
        logits = {h: torch.stack([o[h] for o in outs]).mean(0) for h in outs[0]}
        z = torch.cat(zs, 1)
        if flip:  # chunk, not a slice at len(x): an ONNX trace keeps the batch dynamic
            logits = {h: sum(v.chunk(2)) / 2 for h, v in logits.items()}
            z = z.chunk(2)[0]
        return logits, z


def prepare_input(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network's input from ``x``: uint8 faces are normalised by ``net.input``
    (channels-last when the first convolution's weights are), float passes unchanged."""
    if x.dtype != torch.uint8:
        return x
    x = net.input.normalise(x)
    w = next(net.parameters())
    if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class DlibNet(HeadsNet):
    """dlib's face-recognition ResNet (:class:`faceattrs.dlib_resnet.DlibFaceResNet`, its
    128-d descriptor as the embedding) with one :class:`Head` per task: arch
    ``dlib_resnet``. Its input is fixed by the pretrained network
    (:data:`faceattrs.dlib_resnet.INPUT`: dlib's 150x150 RGB chip, dlib's normalisation);
    ``width``, ``blocks`` and ``stem_stride`` do not apply. Random weights here; training
    starts from dlib's with ``init=dlib``."""

    cam_layer = "backbone.stages.3"  # 4x4 maps (the last stage's 2x2 are too coarse)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.input != DLIB_INPUT:
            raise ValueError(
                f"arch dlib_resnet takes dlib's face chips ({DLIB_INPUT.describe()}, crop "
                f"dlib, dlib's normalisation), not {cfg.input.describe()} ({cfg.input.crop})"
            )
        self.cfg, self.input = cfg, cfg.input
        self.backbone = DlibFaceResNet()
        self.embed_dim = self.backbone.embed_dim
        self.heads = nn.ModuleDict(
            {name: Head(self.embed_dim, k, cfg.dropout) for name, k in cfg.heads.items()}
        )
        for head in self.heads.values():
            nn.init.normal_(head.fc.weight, std=0.01)  # as FaceResNet's: loss starts at log K
            nn.init.zeros_(head.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(prepare_input(self, x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.fc(self.forward_features(x).mean((2, 3)))


ARCHS: dict[str, type[nn.Module]] = {"resnet": FaceResNet, "dlib_resnet": DlibNet}  # arch -> class


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network a checkpoint's settings describe: one network of ``cfg.arch``, or an
    ensemble of ``cfg.members``."""
    return FaceEnsemble(cfg) if cfg.members > 1 else ARCHS[cfg.arch](cfg)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that follows a Conv2d into that conv, in place; for inference.

    The model must be in eval mode (the running statistics are folded in). Outputs are
    unchanged up to rounding; each folded BN becomes an ``nn.Identity``, so module names
    (e.g. ``cam_layer`` for Grad-CAM) stay valid. A few percent faster on the CPU
    (1.01-1.09x measured by ``benchmarks/bench_predict.py``).

    >>> m = FaceResNet(ModelConfig(width=0.125)).eval()
    >>> x = torch.randn(2, 1, 48, 48)
    >>> ref = m(x)["gender"]
    >>> bool(torch.allclose(fuse_batchnorm(m)(x)["gender"], ref, atol=1e-5))
    True
    >>> any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    False
    """
    if model.training:
        raise ValueError("fuse_batchnorm needs a model in eval mode")
    pairs = [("conv1", "bn1"), ("conv2", "bn2")]
    for mod in list(model.modules()):
        if isinstance(mod, BasicBlock):
            for conv, bn in pairs:
                setattr(mod, conv, fuse_conv_bn_eval(getattr(mod, conv), getattr(mod, bn)))
                setattr(mod, bn, nn.Identity())
        elif isinstance(mod, nn.Sequential):
            for i in range(len(mod) - 1):
                if isinstance(mod[i], nn.Conv2d) and isinstance(mod[i + 1], nn.BatchNorm2d):
                    mod[i] = fuse_conv_bn_eval(mod[i], mod[i + 1])
                    mod[i + 1] = nn.Identity()
    return model


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    embed: bool = False,
) -> dict[str, np.ndarray]:
    """Logits per head for uint8 faces (``model.input``'s shape), as float32 numpy ``(N, K)``.

    With ``embed=True`` the result also holds ``"embedding"`` ``(N, D)``.
    The model is put in eval mode; nothing is augmented, except the mirror image when the
    model's ``flip_tta`` is on.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    out: dict[str, list[np.ndarray]] = {}
    images = torch.as_tensor(images)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)  # normalised inside the network
        logits, z = model.logits_and_embedding(x)
        if embed:
            logits = {**logits, "embedding": z}
        for k, v in logits.items():
            out.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
