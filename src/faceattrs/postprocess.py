"""Network outputs -> probabilities and ages, in numpy, shared by every backend.

One softmax (with an optional calibration temperature) and the age model's
post-processing: the two-stage model's routing of per-bin regressor outputs by the
coarse bin probabilities, the direct head's expected age and bin probabilities, and the
clipping to the model's age range. :class:`faceattrs.age.AgeModel` (PyTorch) and the
ONNX backend both call :func:`age_prediction`, so they cannot drift apart.

>>> probs = np.array([[0.7, 0.3], [0.2, 0.8]])
>>> per_bin = np.array([[10.0, 30.0], [12.0, 40.0]])
>>> route(probs, per_bin, "hard").tolist()
[10.0, 40.0]
>>> route(probs, per_bin, "soft").round(6).tolist()
[16.0, 34.4]
>>> route_by_bin(per_bin, np.array([1, 0])).tolist()
[30.0, 12.0]
>>> year_probs_to_bins(np.array([[0.1, 0.2, 0.3, 0.4]]), [2]).tolist()
[[0.30000000000000004, 0.7]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .exceptions import FaceattrsError

ROUTINGS = ("hard", "soft")
APPROACHES = ("two_stage", "direct")
AGE_POINTS = ("mean", "median")  # the direct head's age: expected value or median


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``(N, K)`` logits divided by ``temperature`` (float64).

    >>> softmax(np.array([[0.0, 0.0], [0.0, np.log(3.0)]])).round(2).tolist()
    [[0.5, 0.5], [0.25, 0.75]]
    >>> softmax(np.array([[0.0, 2.0]]), temperature=2.0).round(4).tolist()
    [[0.2689, 0.7311]]
    """
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def route(bin_probs: np.ndarray, per_bin: np.ndarray, routing: str) -> np.ndarray:
    """Combine per-bin predictions ``(N, K)`` with bin probabilities ``(N, K)`` -> ``(N,)``."""
    if routing == "hard":
        return route_by_bin(per_bin, np.argmax(bin_probs, axis=1))
    if routing == "soft":
        return np.sum(bin_probs * per_bin, axis=1)
    raise FaceattrsError(f"unknown age routing {routing!r}; use one of {ROUTINGS}")


def route_by_bin(per_bin: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """The prediction of bin ``bins[i]``'s regressor for each face."""
    return per_bin[np.arange(len(per_bin)), np.asarray(bins)]


def year_probs_to_bins(probs: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Per-year probabilities ``(N, Y)`` -> bin probabilities ``(N, K)`` (summed per bin)."""
    bins = np.searchsorted(np.asarray(edges), np.arange(probs.shape[1]), side="right")
    out = np.zeros((len(probs), len(edges) + 1), dtype=np.float64)
    for k in range(out.shape[1]):
        out[:, k] = probs[:, bins == k].sum(1)
    return out


def expected_years(year_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Direct head: per-year logits ``(N, Y)`` -> (expected age ``(N,)``, probabilities)."""
    probs = softmax(year_logits)
    return probs @ np.arange(probs.shape[1], dtype=np.float64), probs


def year_point(year_logits: np.ndarray, point: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Direct head: per-year logits ``(N, Y)`` -> (one age per face ``(N,)``, probabilities).
    ``point="mean"``: the expected age; ``"median"``: the smallest year whose cumulative
    probability reaches one half (the estimate with the lowest expected absolute error,
    and unmoved by the thin mass that label smoothing spreads over every year).

    >>> year_point(np.log(np.array([[0.1, 0.1, 0.3, 0.5]])), "median")[0].tolist()
    [2.0]
    """
    if point not in AGE_POINTS:
        raise FaceattrsError(f"unknown age point estimate {point!r}; use one of {AGE_POINTS}")
    if point == "mean":
        return expected_years(year_logits)
    probs = softmax(year_logits)
    return (probs.cumsum(1) < 0.5 - 1e-9).sum(1).astype(np.float64), probs


def age_prediction(
    approach: str,
    *,
    edges: Sequence[float],
    clip: Sequence[float],
    routing: str = "soft",
    bin_logits: np.ndarray | None = None,
    per_bin: np.ndarray | None = None,
    year_logits: np.ndarray | None = None,
    interval: dict | None = None,
    point: str = "mean",
) -> dict[str, np.ndarray]:
    """``{"value": (N,) years, "bin": (N,) int, "bin_probabilities": (N, K)}``, plus
    ``"interval": (low (N,), high (N,))`` when ``interval`` (``age.json["interval"]``,
    :func:`faceattrs.age.conformal.fit`) is given.

    ``approach="two_stage"`` needs ``bin_logits`` and ``per_bin`` (``(N, K)`` each);
    ``"direct"`` needs ``year_logits``, whose ``point`` estimate (:func:`year_point`) is the
    age. ``bin`` is the most probable bin (of the coarse classifier, or of the direct head's
    per-year mass summed per bin).
    """
    if approach == "direct":
        value, years = year_point(year_logits, point)
        probs = year_probs_to_bins(years, edges)
    elif approach == "two_stage":
        probs = softmax(bin_logits)
        value = route(probs, np.asarray(per_bin, np.float64), routing)
    else:
        raise FaceattrsError(f"unknown age approach {approach!r}; use one of {APPROACHES}")
    out = {
        "value": np.clip(value, *clip).astype(np.float64),
        "bin": probs.argmax(1),
        "bin_probabilities": probs,
    }
    if interval is not None:
        out["interval"] = conformal_interval(out["value"], out["bin"], interval)
    return out


def conformal_interval(
    value: np.ndarray, pred_bin: np.ndarray, interval: dict, clip=(0.0, np.inf)
) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)``: ``value`` -/+ the half-width of its predicted bin
    (``interval["per_bin"]``, fitted by :func:`faceattrs.age.conformal.fit`), clipped to ``clip``."""
    half = np.asarray(interval["per_bin"], np.float64)[np.asarray(pred_bin)]
    value = np.asarray(value, np.float64)
    return np.clip(value - half, *clip), np.clip(value + half, *clip)
