"""Split-conformal prediction intervals for age.

Fitted on the validation split (never the test split): the absolute residuals
``|age - predicted|`` give, per predicted age bin, the half-width ``q`` such that
``[pred - q, pred + q]`` covers the true age with probability at least ``1 - alpha`` for a
new face exchangeable with that bin's validation faces (the finite-sample quantile
``ceil((n + 1)(1 - alpha)) / n``). A bin with fewer than ``min_count`` validation faces
uses the global half-width. The predicted bin is known at inference time, so the
interval needs nothing but the model's own output.

>>> import numpy as np
>>> from faceattrs.postprocess import conformal_interval as interval  # fit's counterpart

>>> y = np.arange(100.0); pred = y + np.tile([-3.0, 3.0], 50)
>>> w = fit(y, pred, np.zeros(100, int), n_bins=1, alpha=0.1)
>>> w["global"], w["per_bin"]
(3.0, [3.0])
>>> lo, hi = interval(pred, np.zeros(100, int), w)
>>> coverage(y, lo, hi)["coverage"]
1.0
"""

from __future__ import annotations

import math

import numpy as np

ALPHA = 0.1  # 90 % intervals
MIN_COUNT = 30  # fewer validation faces in a bin: that bin uses the global half-width


def conformal_quantile(residuals: np.ndarray, alpha: float = ALPHA) -> float:
    """The split-conformal ``(1 - alpha)`` quantile of absolute residuals (``inf`` when too few)."""
    r = np.sort(np.abs(np.asarray(residuals, np.float64)))
    n = len(r)
    k = math.ceil((n + 1) * (1 - alpha))
    if n == 0 or k > n:
        return math.inf
    return float(r[k - 1])


def fit(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    pred_bin: np.ndarray,
    n_bins: int,
    alpha: float = ALPHA,
    min_count: int = MIN_COUNT,
) -> dict:
    """Half-widths, global and per predicted bin, for ``age.json["interval"]``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    res = np.abs(np.asarray(y_true, np.float64) - np.asarray(y_pred, np.float64))
    pred_bin = np.asarray(pred_bin)
    glob = conformal_quantile(res, alpha)
    per_bin, counts = [], []
    for k in range(n_bins):
        m = pred_bin == k
        counts.append(int(m.sum()))
        per_bin.append(conformal_quantile(res[m], alpha) if m.sum() >= min_count else glob)
    return {
        "method": "split-conformal, absolute residual, per predicted bin",
        "fitted_on": "val",
        "alpha": alpha,
        "global": glob,
        "per_bin": per_bin,
        "val_counts": counts,
        "min_count": min_count,
    }


def coverage(y_true: np.ndarray, low: np.ndarray, high: np.ndarray) -> dict:
    """Share of true ages inside their interval, and the intervals' mean width (years);
    both None for no face (JSON's null, as for an empty group elsewhere)."""
    y = np.asarray(y_true, np.float64)
    inside = (y >= low) & (y <= high)
    return {
        "coverage": round(float(inside.mean()), 4) if len(y) else None,
        "mean_width": round(float(np.mean(high - low)), 3) if len(y) else None,
        "n": int(len(y)),
    }
