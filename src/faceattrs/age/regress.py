"""Stage 2 of the two-stage age model: one small regressor per age bin, and routing.

Each regressor is a small fully connected head on the frozen coarse model's embedding,
trained only on the training faces of its own bin (L1 or Huber loss in years) and
early-stopped on that bin's validation faces (the training:
:func:`faceattrs.age.finetune.train_regressors`: this module is the model layer). Predictions are combined by routing:

- ``hard``: the regressor of the predicted bin (the reference);
- ``soft``: the bin probabilities weight all regressors' outputs;
- ``oracle``: the regressor of the true bin (needs the true age: evaluation only).

Routing itself (``ROUTINGS``, ``route``, ``route_by_bin``) lives in
:mod:`faceattrs.postprocess`, shared with the ONNX backend; its examples are there.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["BinRegressors"]


class BinRegressors(nn.Module):
    """``K`` independent MLPs on a ``(B, D)`` embedding -> ``(B, K)`` ages in years.

    Regressor ``k`` standardises the embedding with its own bin's training statistics
    (``x_mean[k]``, ``x_std[k]``) and predicts ``center[k] + scale[k] * mlp_k(z)``
    (targets standardised per bin, so every head starts near its bin's typical age).
    With ``clip=True`` each output is clamped to ``[low[k], high[k]]``, the range of its
    bin's training ages. All statistics are buffers: they travel in the weights file.
    """

    def __init__(self, dim: int, n_bins: int, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.dim, self.n_bins, self.hidden, self.dropout = dim, n_bins, hidden, dropout
        self.mlps = nn.ModuleList(
            nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, 1),
            )
            for _ in range(n_bins)
        )
        self.register_buffer("x_mean", torch.zeros(n_bins, dim))
        self.register_buffer("x_std", torch.ones(n_bins, dim))
        self.register_buffer("center", torch.zeros(n_bins))
        self.register_buffer("scale", torch.ones(n_bins))
        self.register_buffer("low", torch.full((n_bins,), -math.inf))
        self.register_buffer("high", torch.full((n_bins,), math.inf))

    def settings(self) -> dict:
        return {
            "dim": self.dim,
            "n_bins": self.n_bins,
            "hidden": self.hidden,
            "dropout": self.dropout,
        }

    def fit_statistics(self, k: int, z: np.ndarray, age: np.ndarray) -> None:
        """Set bin ``k``'s input and target statistics from its training data."""
        z = torch.as_tensor(z, dtype=torch.float32)
        self.x_mean[k] = z.mean(0)
        self.x_std[k] = z.std(0, unbiased=False).clamp_min(1e-6) if len(z) > 1 else 1.0
        self.center[k] = float(np.median(age))
        self.scale[k] = max(float(np.std(age)), 1.0)
        self.low[k], self.high[k] = float(age.min()), float(age.max())

    def forward_one(self, k: int, z: torch.Tensor) -> torch.Tensor:
        """Bin ``k``'s unclipped prediction ``(B,)`` in years."""
        x = (z - self.x_mean[k]) / self.x_std[k]
        return self.center[k] + self.scale[k] * self.mlps[k](x).squeeze(1)

    def forward(self, z: torch.Tensor, clip: bool = True) -> torch.Tensor:
        out = torch.stack([self.forward_one(k, z) for k in range(self.n_bins)], dim=1)
        return torch.clamp(out, self.low, self.high) if clip else out
