"""Stage 2 of the two-stage age model: one small regressor per age bin, and routing.

Each regressor is a small fully connected head on the frozen coarse model's embedding,
trained only on the training faces of its own bin (L1 or Huber loss in years) and
early-stopped on that bin's validation faces. Predictions are combined by routing:

- ``hard``: the regressor of the predicted bin (the reference);
- ``soft``: the bin probabilities weight all regressors' outputs;
- ``oracle``: the regressor of the true bin (needs the true age: evaluation only).

Routing itself (``route``, ``route_by_bin``) lives in :mod:`faceattrs.postprocess`, shared
with the ONNX backend; its examples are there.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..exceptions import FaceattrsError
from ..postprocess import ROUTINGS, route, route_by_bin
from .bins import assign_bins

log = logging.getLogger(__name__)

__all__ = ["ROUTINGS", "BinRegressors", "route", "route_by_bin", "train_regressors"]


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


def regression_loss(kind: str, delta: float):
    if kind == "l1":
        return nn.L1Loss()
    if kind == "huber":
        return nn.HuberLoss(delta=delta)
    raise FaceattrsError(f"unknown regression loss {kind!r}; use 'l1' or 'huber'")


def train_regressors(
    z_train: np.ndarray,
    age_train: np.ndarray,
    z_val: np.ndarray,
    age_val: np.ndarray,
    edges: np.ndarray,
    cfg,
) -> tuple[BinRegressors, list[dict]]:
    """Fit one regressor per bin on that bin's training embeddings only.

    ``z_*``: ``(N, D)`` float embeddings; ``age_*``: ``(N,)`` years; ``edges``: inner bin
    edges; ``cfg``: an :class:`~faceattrs.age.config.AgeConfig`. Returns the module
    (eval mode, CPU) and one summary dict per bin (sizes, best epoch, validation MAE).
    """
    n_bins = len(edges) + 1
    b_train, b_val = assign_bins(age_train, edges), assign_bins(age_val, edges)
    reg = BinRegressors(z_train.shape[1], n_bins, cfg.reg_hidden, cfg.reg_dropout)
    summaries = []
    threads = torch.get_num_threads()
    # Tiny MLPs: one thread is many times faster than several on a busy machine.
    torch.set_num_threads(1)
    try:
        for k in tqdm(range(n_bins), desc="age regressors", leave=False):
            summaries.append(
                _fit_bin(reg, k, z_train, age_train, b_train, z_val, age_val, b_val, cfg)
            )
    finally:
        torch.set_num_threads(threads)
    return reg.eval(), summaries


def _fit_bin(reg, k, z_train, age_train, b_train, z_val, age_val, b_val, cfg) -> dict:
    """Bin ``k``: select its faces, set its statistics, train its regressor."""
    tr, va = np.flatnonzero(b_train == k), np.flatnonzero(b_val == k)
    if len(tr) == 0:
        raise FaceattrsError(f"age bin {k} has no training faces: choose other bin edges")
    # Targets clipped to the age range the model predicts in.
    y = np.clip(age_train[tr].astype(np.float32), cfg.min_age, cfg.max_age)
    yv = np.clip(age_val[va].astype(np.float32), cfg.min_age, cfg.max_age)
    reg.fit_statistics(k, z_train[tr], y)
    info = _fit_one(reg, k, z_train[tr], y, z_val[va], yv, cfg)
    log.info(
        "age bin %d: %d train, %d val faces, val MAE %.2f (epoch %d)",
        k,
        len(tr),
        len(va),
        info["val_mae"],
        info["best_epoch"],
    )
    return {"bin": k, "n_train": len(tr), "n_val": len(va), **info}


def _fit_one(
    reg: BinRegressors, k: int, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, cfg
) -> dict:
    """Train ``reg.mlps[k]`` on ``(x, y)``; keep the epoch with the lowest validation MAE
    (training MAE when the bin has no validation faces)."""
    # imported here: age.bundle imports this module for BinRegressors when a model is
    # loaded, and that path must not import the training package (kornia, the whole stage)
    from ..training.loop import EarlyStopping, make_optimizer, run_epochs

    gen = torch.Generator().manual_seed(cfg.seed * 1000 + k)
    torch.manual_seed(cfg.seed * 1000 + k)
    for m in reg.mlps[k].modules():  # re-initialise from the seed: bins are independent
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    has_val = len(xv) > 0
    xv = torch.as_tensor(xv, dtype=torch.float32) if has_val else x
    yv = torch.as_tensor(yv, dtype=torch.float32) if has_val else y
    opt = make_optimizer(reg.mlps[k].parameters(), cfg.reg_lr, cfg.reg_weight_decay)
    loss_fn = regression_loss(cfg.reg_loss, cfg.huber_delta)
    stopper = EarlyStopping(monitor="val_mae", mode="min", patience=cfg.reg_patience)
    best_state: dict[str, torch.Tensor] = {}

    def epoch_fn(epoch: int) -> dict:
        reg.mlps[k].train()
        for idx in torch.randperm(len(x), generator=gen).split(cfg.reg_batch_size):
            loss = loss_fn(reg.forward_one(k, x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        reg.mlps[k].eval()
        with torch.no_grad():
            return {"epoch": epoch, "val_mae": float((reg.forward_one(k, xv) - yv).abs().mean())}

    def on_epoch(row: dict, improved: bool) -> None:
        if improved:
            best_state.update({n: t.clone() for n, t in reg.mlps[k].state_dict().items()})

    run_epochs(range(1, cfg.reg_epochs + 1), epoch_fn, stopper, on_epoch)
    reg.mlps[k].load_state_dict(best_state)
    return {
        "val_mae": round(stopper.best, 4),
        "best_epoch": stopper.best_epoch,
        "epochs": stopper.epoch,
        "monitored": "val" if has_val else "train",
    }
