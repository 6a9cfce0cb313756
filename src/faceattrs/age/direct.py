"""The alternative age model: a direct head on the backbone with a distribution-aware loss.

The head outputs logits over whole years ``0..max_age``; the prediction is the expected
value of the softmax. Two losses:

- ``dldl`` (label distribution learning, DLDL-v2): cross-entropy to a Gaussian centred
  on the true age (std ``sigma`` years) plus an L1 term on the expected age;
- ``mean_variance`` (Pan et al., 2018): cross-entropy to the true year plus a squared
  error on the mean and a penalty on the variance of the distribution.

>>> logits = torch.zeros(1, 101)
>>> round(float(expected_age(logits)), 3)  # uniform over 0..100
50.0
>>> q = gaussian_targets(torch.tensor([30.0]), 101, sigma=2.0)
>>> int(q.argmax()), round(float(q.sum()), 4)
(30, 1.0)
>>> good, flat = (q + 1e-9).log(), torch.zeros(1, 101)
>>> bool(dldl_loss(good, torch.tensor([30.0]), 2.0, 1.0) < dldl_loss(flat, torch.tensor([30.0]), 2.0, 1.0))
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..exceptions import FaceattrsError

HEAD = "age"  # name of the direct head in FaceResNet
LOSSES = ("dldl", "mean_variance")


def n_years(max_age: float) -> int:
    """Classes of the per-year softmax: ages ``0..max_age``."""
    return int(max_age) + 1


def expected_age(logits: torch.Tensor) -> torch.Tensor:
    """``(B, Y)`` logits over years ``0..Y-1`` -> ``(B,)`` expected age."""
    years = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
    return logits.float().softmax(1) @ years


def gaussian_targets(age: torch.Tensor, n_classes: int, sigma: float) -> torch.Tensor:
    """``(B,)`` ages -> ``(B, Y)`` discretised Gaussian label distributions (rows sum to 1)."""
    years = torch.arange(n_classes, device=age.device, dtype=torch.float32)
    q = torch.exp(-0.5 * ((years[None] - age.float()[:, None]) / sigma) ** 2)
    return q / q.sum(1, keepdim=True)


def dldl_loss(logits: torch.Tensor, age: torch.Tensor, sigma: float, mean_weight: float):
    """Cross-entropy to the Gaussian label distribution + ``mean_weight`` x L1(E[age], age)."""
    logits = logits.float()
    q = gaussian_targets(age, logits.shape[1], sigma)
    ld = -(q * logits.log_softmax(1)).sum(1).mean()
    return ld + mean_weight * (expected_age(logits) - age.float()).abs().mean()


def mean_variance_loss(
    logits: torch.Tensor, age: torch.Tensor, mean_weight: float, var_weight: float
):
    """Cross-entropy to the true year + mean loss (half squared error) + variance loss."""
    logits = logits.float()
    p = logits.softmax(1)
    years = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
    mean = p @ years
    var = (p * (years[None] - mean[:, None]) ** 2).sum(1)
    ce = F.cross_entropy(logits, age.round().long().clamp(0, logits.shape[1] - 1))
    return ce + mean_weight * 0.5 * ((mean - age.float()) ** 2).mean() + var_weight * var.mean()


def make_loss(cfg):
    """The configured loss as ``fn(logits (B, Y), age (B,) float) -> scalar``."""
    if cfg.direct_loss == "dldl":
        return lambda lg, a: dldl_loss(lg, a, cfg.direct_sigma, cfg.direct_mean_weight)
    if cfg.direct_loss == "mean_variance":
        return lambda lg, a: mean_variance_loss(
            lg, a, cfg.direct_mean_weight, cfg.direct_var_weight
        )
    raise FaceattrsError(f"unknown direct age loss {cfg.direct_loss!r}; use one of {LOSSES}")
