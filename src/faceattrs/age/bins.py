"""Age bins: edges from training-age quantiles, bin assignment and labels.

Bins are half-open, ``[lo, hi)``; the first starts at 0 and the last is open-ended.
Only the inner edges are stored: edges ``(16, 26, 29, 37, 53)`` (the reference's) give
the six bins ``[0,16) [16,26) [26,29) [29,37) [37,53) [53,inf)``.

>>> edges = quantile_edges(np.arange(1, 601), 6)
>>> edges.tolist()
[101, 201, 301, 401, 501]
>>> np.bincount(assign_bins(np.arange(1, 601), edges)).tolist()
[100, 100, 100, 100, 100, 100]
>>> assign_bins(np.array([0, 15.9, 16, 53, 116]), np.array([16, 26, 29, 37, 53])).tolist()
[0, 0, 1, 5, 5]
>>> bin_labels([16, 26, 29, 37, 53])
['0-16', '16-26', '26-29', '29-37', '37-53', '53+']
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..exceptions import FaceattrsError

REFERENCE_EDGES = (16, 26, 29, 37, 53)  # the reference's [0,16] ... [53,90]


class BinError(FaceattrsError):
    """Age-bin edges that are not strictly increasing or leave a bin empty."""


def quantile_edges(ages: np.ndarray, n_bins: int = 6) -> np.ndarray:
    """``n_bins - 1`` integer inner edges that split ``ages`` into bins of about equal size.

    Ages are whole years, so an edge can only fall between two distinct ages: each edge
    is the age value whose count of smaller ages is closest to ``k * N / n_bins``.
    """
    ages = np.sort(np.asarray(ages, dtype=np.float64))
    if n_bins < 2:
        raise BinError(f"need at least 2 age bins, got {n_bins}")
    if len(ages) < n_bins:
        raise BinError(f"cannot make {n_bins} age bins from {len(ages)} ages")
    candidates = np.unique(np.round(ages))
    candidates = np.append(candidates, candidates[-1] + 1)
    below = np.searchsorted(ages, candidates, side="left")  # ages < candidate
    edges = []
    for k in range(1, n_bins):
        target = k * len(ages) / n_bins
        order = np.argsort(np.abs(below - target), kind="stable")
        lowest = edges[-1] if edges else -np.inf
        edge = next((candidates[i] for i in order if candidates[i] > lowest), None)
        if edge is None:
            raise BinError(f"too few distinct ages to make {n_bins} age bins")
        edges.append(edge)
    out = np.asarray(edges, dtype=np.int64)
    check_edges(out)
    return out


def check_edges(edges: Sequence[float]) -> np.ndarray:
    """Validate inner edges: strictly increasing and positive."""
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 1:
        raise BinError("age-bin edges must be a non-empty list such as 16,26,29,37,53")
    if np.any(np.diff(edges) <= 0) or edges[0] <= 0:
        raise BinError(f"age-bin edges must be positive and strictly increasing: {edges.tolist()}")
    return edges


def assign_bins(ages: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin index of each age: bin ``k`` holds ``edges[k-1] <= age < edges[k]``."""
    return np.searchsorted(np.asarray(edges), np.asarray(ages), side="right").astype(np.int64)


def bin_labels(edges: Sequence[float]) -> list[str]:
    """Readable labels, e.g. ``'16-26'``, the last open-ended ``'53+'``."""
    e = [_fmt(x) for x in edges]
    return [f"0-{e[0]}"] + [f"{a}-{b}" for a, b in zip(e[:-1], e[1:], strict=True)] + [f"{e[-1]}+"]


def bin_ranges(edges: Sequence[float], max_age: float) -> list[tuple[float, float]]:
    """``(lo, hi)`` of each bin, the last one closed at ``max_age``."""
    lo = [0.0, *map(float, edges)]
    hi = [*map(float, edges), float(max_age)]
    return list(zip(lo, hi, strict=True))


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
