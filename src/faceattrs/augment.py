"""Batched augmentation on tensors (kornia), on the training device.

``normalise`` turns uint8 faces into the model's input, with no augmentation (evaluation,
prediction).
"""

from __future__ import annotations

import torch

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
