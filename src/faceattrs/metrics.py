"""Classification, per-group and calibration metrics: pure functions on numpy arrays, JSON-ready results.

Every function takes integer labels / scores as arrays and returns plain Python values
(floats, lists, dicts) so the result can go straight into ``metrics.json``. Accuracy, F1,
precision / recall, confusion matrices and ROC come from scikit-learn.

>>> r = classification_report([0, 0, 1, 1], [0, 1, 1, 1], ["Male", "Female"])
>>> r["accuracy"], round(r["macro_f1"], 4), r["confusion"]
(0.75, 0.7333, [[1, 1], [0, 2]])
>>> r["per_class"]["Female"]
{'precision': 0.6667, 'recall': 1.0, 'f1': 0.8, 'support': 2}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
    roc_curve,
)

# Age groups for the fairness breakdown: lower edges in years, the last group open-ended.
AGE_GROUP_EDGES = (0, 13, 20, 30, 45, 60)
# Age strata for the age-standardised fairness view: children (0-12), whose gender is hard
# to tell from a face, and everyone older. Two strata keep every ethnicity in both (the
# six groups above leave "Other" with no face aged 60+ in the test split).
STANDARD_AGE_EDGES = (0, 13)


def classification_report(
    y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str]
) -> dict:
    """Accuracy, macro-F1, per-class precision / recall / F1 / support, confusion counts.

    ``names[k]`` is the name of class ``k``; the confusion matrix has rows = true class,
    columns = predicted class, over all ``len(names)`` classes. Macro-F1 averages over
    the classes that occur in ``y_true`` or ``y_pred`` (scikit-learn's default), so an
    external file without some class is not penalised for it.

    >>> r = classification_report([0, 1, 2, 2], [0, 2, 2, 2], ["a", "b", "c"])
    >>> r["per_class"]["b"], r["per_class"]["c"]["precision"]
    ({'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 1}, 0.6667)
    >>> round(r["macro_f1"], 4)  # (1 + 0 + 0.8) / 3
    0.6
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {
        name: {"precision": _r(p[k]), "recall": _r(r[k]), "f1": _r(f[k]), "support": int(s[k])}
        for k, name in enumerate(names)
    }
    return {
        "accuracy": _r(accuracy_score(y_true, y_pred)),
        "macro_f1": _r(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n": int(len(y_true)),
    }


def scores_from_confusion(cm: Sequence[Sequence[int]]) -> dict[str, float]:
    """Accuracy and macro-F1 of a ``(K, K)`` confusion matrix (rows = true class), with
    scikit-learn's macro-F1 (mean over the classes present in truth or prediction).

    >>> scores_from_confusion(np.array([[2, 0], [1, 1]]))
    {'accuracy': 0.75, 'macro_f1': 0.7333333333333334}
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = len(cm)
    true, pred = np.divmod(np.arange(k * k), k)
    y_true, y_pred = np.repeat(true, cm.ravel()), np.repeat(pred, cm.ravel())
    if len(y_true) == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    f1 = f1_score(y_true, y_pred, average="macro", zero_division=0)
    return {"accuracy": float(np.mean(y_true == y_pred)), "macro_f1": float(f1)}


def row_normalise(confusion: Sequence[Sequence[int]]) -> np.ndarray:
    """Confusion counts -> each row divided by its sum (recall on the diagonal); empty rows stay 0.

    >>> row_normalise([[3, 1], [0, 0]]).tolist()
    [[0.75, 0.25], [0.0, 0.0]]
    """
    cm = np.asarray(confusion, dtype=np.float64)
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)


def binary_roc(y_true: Sequence[int], score: Sequence[float]) -> dict | None:
    """ROC curve and AUC for a binary task (positive class = 1); None if a class is absent.

    >>> r = binary_roc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> r["auc"], r["fpr"], r["tpr"]
    (0.75, [0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    y_true, score = np.asarray(y_true), np.asarray(score)
    if len(np.unique(y_true)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y_true, score)
    return {
        "auc": float(roc_auc_score(y_true, score)),
        "fpr": [_r(v) for v in fpr],
        "tpr": [_r(v) for v in tpr],
    }


def macro_recall(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean recall over the classes present in ``y_true`` (balanced accuracy).

    Within one ethnicity group this is that class's recall; within a gender or age group
    it weighs every ethnicity equally, so groups with different class mixes compare fairly.

    >>> macro_recall([0, 0, 0, 1], [0, 0, 1, 0])  # (2/3 + 0) / 2
    0.3333
    """
    y_true = np.asarray(y_true)
    present = np.unique(y_true)
    value = recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    return _r(value)


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of equal labels.

    >>> accuracy([1, 0, 1, 1], [1, 1, 1, 0])
    0.5
    """
    return _r(accuracy_score(y_true, y_pred))


def age_group_names(edges: Sequence[int] = AGE_GROUP_EDGES) -> list[str]:
    """Names of the age groups that start at ``edges`` (years).

    >>> age_group_names((0, 13, 20, 60))
    ['0-12', '13-19', '20-59', '60+']
    """
    names = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return names + [f"{edges[-1]}+"]


def age_groups(age: Sequence[int], edges: Sequence[int] = AGE_GROUP_EDGES) -> np.ndarray:
    """Ages in years -> group names (half-open ``[lo, hi)``, the last group open-ended).

    >>> age_groups([5, 12, 13, 29, 30, 60, 99], (0, 13, 30, 60)).tolist()
    ['0-12', '0-12', '13-29', '13-29', '30-59', '60+', '60+']
    """
    return np.asarray(age_group_names(edges), dtype=object)[age_group_codes(age, edges)]


def age_group_codes(age: Sequence[int], edges: Sequence[int] = AGE_GROUP_EDGES) -> np.ndarray:
    """Ages in years -> the index of their group (as :func:`age_groups` names them).

    >>> age_group_codes([5, 12, 13, 70], (0, 13)).tolist()
    [0, 0, 1, 1]
    """
    idx = np.searchsorted(np.asarray(edges), np.asarray(age), side="right") - 1
    return np.clip(idx, 0, len(edges) - 1)


def per_group(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y_true: Sequence[int],
    y_pred: Sequence[int],
    groups: Sequence,
    order: Sequence | None = None,
    min_size: int = 1,
) -> dict:
    """``metric`` within each group, and the largest gap between groups of ``min_size`` or more.

    Returns ``{"groups": {name: {"value", "n"}}, "max_gap", "gap_between": [low, high],
    "min_size"}``; groups smaller than ``min_size`` are listed but left out of the gap
    (their value is too noisy to call a bias). ``order`` fixes the group order (groups
    absent from the data are skipped).

    >>> r = per_group(accuracy, [1, 1, 0, 0, 1], [1, 0, 0, 0, 1], ["a", "a", "b", "b", "c"],
    ...               min_size=2)
    >>> r["groups"]["a"], r["max_gap"], r["gap_between"]
    ({'value': 0.5, 'n': 2}, 0.5, ['a', 'b'])
    """
    y_true, y_pred, groups = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups)
    names = [g for g in (order if order is not None else np.unique(groups)) if (groups == g).any()]
    out = {}
    for g in names:
        mask = groups == g
        out[str(g)] = {"value": float(metric(y_true[mask], y_pred[mask])), "n": int(mask.sum())}
    counted = {k: v["value"] for k, v in out.items() if v["n"] >= min_size}
    gap, between = _largest_gap(counted)
    return {"groups": out, "max_gap": gap, "gap_between": between, "min_size": min_size}


def _largest_gap(values: dict) -> tuple[float | None, list | None]:
    """``(largest minus smallest, [smallest's name, largest's])``; two different names even
    when every value is equal; ``(None, None)`` with fewer than two values."""
    if len(values) < 2:
        return None, None
    low, high = min(values, key=values.get), max(values, key=values.get)
    if low == high:  # all equal
        high = next(k for k in reversed(list(values)) if k != low)
    return _r(values[high] - values[low]), [low, high]


def standardised(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y_true: Sequence[int],
    y_pred: Sequence[int],
    groups: Sequence,
    strata: Sequence,
    order: Sequence | None = None,
    min_size: int = 1,
    strata_order: Sequence | None = None,
) -> dict:
    """``metric`` per group, directly standardised over ``strata`` (e.g. age groups).

    A group's value is the mean of its values within each stratum, weighted by the
    stratum's share of *all* the faces (not of the group's own): what the group would
    score with everyone's mix of strata. It separates a gap the model makes from a gap that
    the groups' mix explains (gender accuracy by ethnicity: children's gender is hard to
    tell, and one ethnicity may hold three times the children of another). A group absent
    from a stratum has no standardised value (``None``; listed, left out of the gap).

    Returns :func:`per_group`'s shape, each group with ``by_stratum`` (``{"value", "n"}``
    per stratum), plus ``"strata"``: ``{stratum: weight}`` (in ``strata_order``).

    >>> r = standardised(accuracy, [1, 1, 1, 0, 1], [1, 1, 1, 1, 1],
    ...                  ["a", "a", "b", "b", "b"], ["kid", "old", "kid", "kid", "old"])
    >>> r["strata"], r["groups"]["b"]["value"], r["max_gap"]  # b: 1/2 on kids, 1 on the rest
    ({'kid': 0.6, 'old': 0.4}, 0.7, 0.3)
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    groups, strata = np.asarray(groups), np.asarray(strata)
    levels = strata_order if strata_order is not None else np.unique(strata)
    levels = [s for s in levels if (strata == s).any()]
    weights = {str(s): (strata == s).mean() for s in levels}
    names = [g for g in (order if order is not None else np.unique(groups)) if (groups == g).any()]
    out = {}
    for g in names:
        cells, value = {}, 0.0
        for s in levels:
            mask = (groups == g) & (strata == s)
            v = float(metric(y_true[mask], y_pred[mask])) if mask.any() else None
            cells[str(s)] = {"value": v, "n": int(mask.sum())}
            value = None if v is None or value is None else value + weights[str(s)] * v
        n = int((groups == g).sum())
        out[str(g)] = {"value": None if value is None else _r(value), "n": n, "by_stratum": cells}
    counted = {
        k: v["value"] for k, v in out.items() if v["n"] >= min_size and v["value"] is not None
    }
    gap, between = _largest_gap(counted)
    return {
        "groups": out,
        "max_gap": gap,
        "gap_between": between,
        "min_size": min_size,
        "strata": {k: _r(w) for k, w in weights.items()},
    }


def cross_tab(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y_true: Sequence[int],
    y_pred: Sequence[int],
    rows: Sequence,
    cols: Sequence,
    row_order: Sequence,
    col_order: Sequence,
) -> dict:
    """``metric`` in every cell of two groupings: ``{"rows", "cols", "value", "n"}``, the
    last two as row-major lists of lists (``value`` None where a cell has no face).

    >>> t = cross_tab(accuracy, [1, 0, 1], [1, 1, 1], ["a", "a", "b"], ["x", "y", "x"],
    ...               ["a", "b"], ["x", "y"])
    >>> t["value"], t["n"]
    ([[1.0, 0.0], [1.0, None]], [[1, 1], [1, 0]])
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rows, cols = np.asarray(rows), np.asarray(cols)
    value, count = [], []
    for r in row_order:
        value.append([]), count.append([])
        for c in col_order:
            mask = (rows == r) & (cols == c)
            value[-1].append(float(metric(y_true[mask], y_pred[mask])) if mask.any() else None)
            count[-1].append(int(mask.sum()))
    return {"rows": list(row_order), "cols": list(col_order), "value": value, "n": count}


# ---------------------------------------------------------------- selective prediction

COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)  # shares of faces kept, most confident first


def selective(
    y_true: Sequence[int], probs: np.ndarray, coverages: Sequence[float] = COVERAGES
) -> dict:
    """Accuracy when only the most confident faces are answered (selective prediction):
    faces ranked by their top probability, the first ``ceil(c * n)`` kept for each share
    ``c``. ``{"at": [{"coverage", "threshold", "accuracy", "n"}], "curve": {"coverage",
    "accuracy"}}``; ``threshold`` is the lowest kept confidence (a user answering only
    faces at or above it keeps about that share on data like this), ``curve`` the
    accuracy at every share, thinned to at most 101 points, for the figure.

    >>> r = selective([0, 1, 1, 0], np.array([[.9, .1], [.2, .8], [.6, .4], [.45, .55]]))
    >>> [(a["coverage"], a["threshold"], a["accuracy"]) for a in r["at"]][:3]
    [(1.0, 0.55, 0.5), (0.9, 0.55, 0.5), (0.8, 0.55, 0.5)]
    >>> r["at"][-1]  # the two most confident faces (0.9, 0.8): both right
    {'coverage': 0.5, 'threshold': 0.8, 'accuracy': 1.0, 'n': 2}
    """
    y, probs = np.asarray(y_true), np.asarray(probs)
    conf = probs.max(1)
    order = np.argsort(-conf, kind="stable")
    conf, right = conf[order], (probs.argmax(1) == y)[order]
    n = len(y)
    if n == 0:
        return {"at": [], "curve": {"coverage": [], "accuracy": []}}
    running = np.cumsum(right) / np.arange(1, n + 1)  # accuracy of the k most confident
    at = []
    for c in coverages:
        k = max(1, int(np.ceil(c * n - 1e-9)))
        at.append(
            {"coverage": float(c), "threshold": _r(conf[k - 1]),
             "accuracy": _r(running[k - 1]), "n": k}
        )  # fmt: skip
    ks = np.unique(np.linspace(1, n, min(n, 101)).round().astype(int))
    curve = {"coverage": [_r(k / n) for k in ks], "accuracy": [_r(running[k - 1]) for k in ks]}
    return {"at": at, "curve": curve}


# ---------------------------------------------------------------- calibration

N_BINS = 15  # equal-width bins on the max probability, as in Guo et al. (2017)


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Bin predictions by confidence (max probability) into ``n_bins`` equal-width bins.

    Bin ``b`` holds confidences in ``(b / n, (b + 1) / n]``. Returns lists of length
    ``n_bins``: ``count``, mean ``confidence`` and ``accuracy`` per bin (None when empty),
    plus ``edges`` (``n_bins + 1``).

    >>> b = reliability_bins(np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]), np.array([0, 1, 1]), 2)
    >>> b["count"], b["confidence"], b["accuracy"]
    ([0, 3], [None, 0.7333], [None, 0.6667])
    """
    probs, y_true = np.asarray(probs), np.asarray(y_true)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    mean = lambda s, c: round(float(s / c), 4) if c else None  # noqa: E731
    return {
        "edges": np.linspace(0, 1, n_bins + 1).round(4).tolist(),
        "count": count.tolist(),
        "confidence": [mean(s, c) for s, c in zip(conf_sum, count, strict=True)],
        "accuracy": [mean(s, c) for s, c in zip(acc_sum, count, strict=True)],
    }


def expected_calibration_error(
    probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS
) -> float:
    """ECE = sum over bins of (bin share) x |accuracy - mean confidence|, on max probability.

    >>> probs = np.array([[0.75, 0.25]] * 4)  # four predictions of class 0 at 0.75
    >>> expected_calibration_error(probs, np.array([0, 0, 0, 1]))  # 3 of 4 right: calibrated
    0.0
    >>> expected_calibration_error(probs, np.array([0, 0, 0, 0]))  # all right: |1 - 0.75|
    0.25
    """
    probs, y_true = np.asarray(probs), np.asarray(y_true)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    gap = np.bincount(idx, weights=correct - conf, minlength=n_bins)
    return round(float(np.abs(gap).sum() / max(len(conf), 1)), 4)


def _r(x: float) -> float:
    """Round for JSON (4 decimals are more than any of these estimates supports)."""
    return round(float(x), 4)
