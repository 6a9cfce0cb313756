"""Batched augmentation on tensors (kornia), on the training device.

``normalise`` turns uint8 faces into the model's input, with no augmentation (evaluation,
prediction). :class:`Augmenter` is the training transform of the reference: the *base*
list on every image, the *extra* list on images of minority ethnicity classes only
(per sample, inside the batch). Every op runs once per batch, in [0, 1]; the result is
standardised to [-1, 1] like ``normalise``.

>>> aug = Augmenter(AugmentConfig(), minority=(1, 2, 3, 4))
>>> x = aug(torch.zeros(4, 48, 48, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
>>> tuple(x.shape), bool(x.min() >= -1) and bool(x.max() <= 1)
((4, 1, 48, 48), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import kornia.augmentation as K
import numpy as np
import torch
from torch import nn

from .checkpoint import NORMALISATION


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 48, 48)`` or ``(B, 1, 48, 48)`` -> float ``(B, 1, 48, 48)`` in [-1, 1].

    >>> normalise(torch.tensor([[[0, 255]]], dtype=torch.uint8)).tolist()
    [[[[-1.0, 1.0]]]]
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    x = images.float().div_(255.0)
    return x.sub_(NORMALISATION["mean"]).div_(NORMALISATION["std"])


@dataclass
class AugmentConfig:
    """The reference's two lists (section Augmentation). Defaults = the reference."""

    enabled: bool = True  # False: training images are only normalised (ablations)
    # base list, every training image
    crop_padding: int = 3  # RandomCrop 48 with this zero padding
    hflip_p: float = 0.5  # RandomHorizontalFlip probability
    rotation: float = 8.0  # RandomRotation, +- degrees (always applied)
    translate: float = 0.03  # RandomAffine translation, fraction of the side
    scale_min: float = 0.95  # RandomAffine scale range
    scale_max: float = 1.05
    erase_p: float = 0.1  # RandomErasing probability
    erase_min: float = 0.02  # RandomErasing area, fraction of the image
    erase_max: float = 0.10
    # [ours] erased pixels get 0.5 in [0, 1], i.e. 0 after standardisation: what
    # torchvision's RandomErasing(value=0) gives when it runs after Normalize.
    erase_value: float = 0.5
    # extra list, images of minority ethnicity classes only (after the base list)
    extra_crop_min: float = 0.85  # RandomResizedCrop scale (min, 1.0)
    extra_brightness: float = 0.08  # ColorJitter brightness
    extra_contrast: float = 0.1  # ColorJitter contrast
    extra_rotation: float = 10.0  # RandomRotation, +- degrees
    extra_erase_p: float = 0.3  # RandomErasing probability (torchvision's default area)
    # [ours] minority = classes with fewer than this fraction of the largest class's count
    minority_ratio: float = 0.5


def minority_classes(ethnicity: Sequence[int] | np.ndarray | torch.Tensor, ratio: float = 0.5):
    """Ethnicity ids whose training count is below ``ratio`` x the largest class's count.

    >>> minority_classes([0, 0, 0, 0, 1, 2, 2, 2], ratio=0.5)
    (1,)
    """
    labels = np.asarray(torch.as_tensor(ethnicity).cpu(), dtype=np.int64)
    counts = np.bincount(labels)
    return tuple(int(i) for i, c in enumerate(counts) if 0 < c < ratio * counts.max())


class Augmenter(nn.Module):
    """``(uint8 (B, 48, 48), ethnicity (B,) long) -> float (B, 1, 48, 48)`` in [-1, 1].

    Runs on whatever device the inputs live on; randomness comes from torch's global
    generator of that device (seed it per epoch for reproducible runs).
    """

    def __init__(self, cfg: AugmentConfig | None = None, minority: Sequence[int] = ()):
        super().__init__()
        self.cfg = cfg = cfg or AugmentConfig()
        self.register_buffer("minority", torch.tensor(sorted(minority), dtype=torch.long))
        self.base = nn.Sequential(
            K.RandomCrop((48, 48), padding=cfg.crop_padding, fill=0.0),
            K.RandomHorizontalFlip(p=cfg.hflip_p),
            K.RandomRotation(cfg.rotation, p=1.0),
            K.RandomAffine(
                0.0, translate=(cfg.translate, cfg.translate),
                scale=(cfg.scale_min, cfg.scale_max), p=1.0,
            ),
            K.RandomErasing(
                scale=(cfg.erase_min, cfg.erase_max), value=cfg.erase_value, p=cfg.erase_p
            ),
        )
        self.extra = nn.Sequential(
            K.RandomResizedCrop((48, 48), scale=(cfg.extra_crop_min, 1.0), p=1.0),
            K.ColorJitter(brightness=cfg.extra_brightness, contrast=cfg.extra_contrast, p=1.0),
            K.RandomRotation(cfg.extra_rotation, p=1.0),
            K.RandomErasing(value=cfg.erase_value, p=cfg.extra_erase_p),
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor, ethnicity: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        x = images.float().div_(255.0)  # kornia's colour ops assume [0, 1]
        if self.cfg.enabled and len(x):
            x = self.base(x)
            if len(self.minority):
                mask = torch.isin(ethnicity, self.minority.to(ethnicity.device))
                if bool(mask.any()):
                    x[mask] = self.extra(x[mask])
            x = x.clamp_(0.0, 1.0)
        return x.sub_(NORMALISATION["mean"]).div_(NORMALISATION["std"])
