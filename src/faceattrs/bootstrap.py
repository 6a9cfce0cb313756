"""Bootstrap confidence intervals (:func:`bootstrap_ci`) and the statistics they resample:
vectorised over a leading axis of resamples, each equal to its :mod:`faceattrs.metrics`
counterpart on one sample (``tests/test_metrics.py``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from .metrics import _r

BOOTSTRAP_RESAMPLES = 1000  # faceattrs evaluate --bootstrap


def bootstrap_ci(
    statistic: Callable[..., np.ndarray],
    *data: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> list[float] | None:
    """Percentile bootstrap interval of ``statistic(*data, axis=-1)`` (vectorised): the faces
    resampled with replacement, ``data``'s arrays paired face by face
    (``scipy.stats.bootstrap``, seeded). ``[low, high]``, or None when the statistic is
    undefined on the resamples (NaN, as a gap with fewer than two groups).

    >>> y = np.r_[np.ones(80), np.zeros(20)]
    >>> low, high = bootstrap_ci(boot_accuracy, y, np.ones(100))
    >>> 0.70 < low < 0.8 < high < 0.9
    True
    """
    # SciPy: evaluation only (inference never loads it: tests/test_layers.py)
    from scipy.stats import bootstrap

    # an undefined statistic (NaN on every resample) is answered None below, not warned
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = bootstrap(
            data,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=resamples,
            confidence_level=level,
            method="percentile",
            batch=100,
            random_state=np.random.default_rng(seed),
        )
    low, high = res.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    return [_r(low), _r(high)]


# Vectorised statistics for bootstrap_ci: each takes (..., n) arrays and reduces the last
# axis; on the whole sample each equals the function of this module (tests check that).


def boot_accuracy(y: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray:
    """:func:`accuracy`, vectorised."""
    return (y == p).mean(axis)


def boot_macro_f1(y: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray:
    """scikit-learn's macro-F1 (classes: those in ``y`` or ``p``), vectorised."""
    classes = np.union1d(np.unique(y), np.unique(p))
    f1 = []
    for k in classes:
        tp = ((y == k) & (p == k)).sum(axis)
        wrong = ((y == k) != (p == k)).sum(axis)  # false positives + false negatives
        f1.append(np.where(tp + wrong > 0, 2 * tp / (2 * tp + wrong), np.nan))
    return np.nanmean(np.stack(f1), axis=0)


def boot_auc(y: np.ndarray, score: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC AUC of binary ``y`` (1 = positive) by the rank-sum (Mann-Whitney) formula, ties
    averaged, as ``roc_auc_score``; vectorised (NaN where one class is absent)."""
    # SciPy: evaluation only (inference never loads it: tests/test_layers.py)
    from scipy.stats import rankdata

    ranks = rankdata(score, axis=axis)
    pos = (y == 1).sum(axis)
    neg = y.shape[axis] - pos
    u = (ranks * (y == 1)).sum(axis) - pos * (pos + 1) / 2
    return np.where((pos > 0) & (neg > 0), u / np.maximum(pos * neg, 1), np.nan)


def boot_mae(y: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.abs(y - pred).mean(axis)


def boot_cs(y: np.ndarray, pred: np.ndarray, within: float = 5.0, axis: int = -1) -> np.ndarray:
    """Share of faces within ``within`` years (CS@5), vectorised."""
    return (np.abs(y - pred) <= within).mean(axis)


def boot_pair_gap(low: int, high: int) -> Callable[..., np.ndarray]:
    """Accuracy of group ``high`` minus that of group ``low`` as a vectorised statistic of
    ``(correct, group code)``: the gap of :func:`per_group` between the two groups it
    names, the pair kept fixed over the resamples (the largest gap re-chosen on each
    resample would lean high: with five groups, some pair always differs)."""

    def gap(correct: np.ndarray, code: np.ndarray, axis: int = -1) -> np.ndarray:
        return _accuracy_in(code == high, correct, axis) - _accuracy_in(code == low, correct, axis)

    return gap


def boot_standardised_pair_gap(low: int, high: int) -> Callable[..., np.ndarray]:
    """:func:`standardised`'s value of group ``high`` minus that of group ``low``, as a
    vectorised statistic of ``(correct, group code, stratum code)``; the stratum weights
    are each resample's own."""

    def gap(correct: np.ndarray, code: np.ndarray, stratum: np.ndarray, axis: int = -1):
        strata, total = np.unique(stratum), stratum.shape[axis]

        def value(g):
            out = 0.0
            for s in strata:
                weight = (stratum == s).sum(axis) / total
                acc = _accuracy_in((code == g) & (stratum == s), correct, axis)
                out = out + np.where(weight > 0, weight * acc, 0.0)
            return out

        return value(high) - value(low)

    return gap


def _accuracy_in(mask: np.ndarray, correct: np.ndarray, axis: int) -> np.ndarray:
    """Share of ``correct`` (1/0) among the faces in ``mask``, vectorised; NaN for none."""
    n = mask.sum(axis)
    return np.where(n > 0, (mask & (correct == 1)).sum(axis) / np.maximum(n, 1), np.nan)
