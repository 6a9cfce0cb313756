"""De-duplication before splitting: exact copies by hashing the pixel array, then
near-duplicates by cosine similarity between pixel vectors scaled to [-1, 1].

The similarity search runs in blocks (never an n x n matrix) and groups transitively
(connected components). One row per group is kept: the first in file order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass
class DedupResult:
    """``group[i]``: the group id of row i; ``keep``: sorted indices of rows kept;
    ``kind[i]``: "" (kept), "exact" or "near" for removed rows;
    ``conflict_groups``: ids of groups whose labels disagree; ``pairs``: (kept, removed)
    row pairs, one per removed row, for the figure."""

    group: np.ndarray
    keep: np.ndarray
    kind: np.ndarray
    rep: np.ndarray
    conflict_groups: np.ndarray
    conflict_fields: dict[str, int]
    similarity: np.ndarray


def exact_groups(images: np.ndarray) -> np.ndarray:
    """Group id per row such that rows with identical pixels share an id.

    >>> a = np.zeros((3, 2, 2), np.uint8); a[1] += 1
    >>> exact_groups(a).tolist()
    [0, 1, 0]
    """
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    view = flat.view(np.dtype((np.void, flat.shape[1])))
    _, first, inverse = np.unique(view.ravel(), return_index=True, return_inverse=True)
    # renumber groups by first occurrence so ids follow file order
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.ravel()]


def scaled_unit_vectors(images: np.ndarray) -> np.ndarray:
    """Pixels scaled to [-1, 1], then L2-normalised rows (float32)."""
    x = images.reshape(len(images), int(np.prod(images.shape[1:]))).astype(np.float32) / 127.5 - 1.0
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-6)


def block_projection(vectors: np.ndarray, cell: int = 4) -> np.ndarray:
    """Project square images' vectors onto the orthonormal basis of ``cell`` x ``cell``
    block indicators (1_B / sqrt(|B|)): block sums / ``cell``. Never lengthens a vector."""
    side = int(round(np.sqrt(vectors.shape[1])))
    k = side // cell
    x = vectors.reshape(len(vectors), k, cell, k, cell)
    return x.sum(axis=(2, 4)).reshape(len(vectors), k * k) / cell


def near_pairs(vectors: np.ndarray, threshold: float, block: int = 2048):
    """All pairs (i < j) of unit vectors with cosine similarity >= threshold.

    Exact and lossless, but cheap: for unit vectors, cos >= t  <=>  |u - v|^2 <= 2 - 2t,
    and an orthogonal projection P never lengthens a vector, so every true pair has
    |Pu - Pv|^2 <= 2 - 2t. Candidates are found block by block on 4x4-pooled images
    (144 dimensions; never an n x n matrix), then checked in full dimension.
    Returns ``(i, j, similarity)`` arrays.
    """
    n = len(vectors)
    proj = block_projection(vectors)
    sq = np.einsum("ij,ij->i", proj, proj)
    radius = 2.0 - 2.0 * threshold + 1e-4  # slack for float32 rounding
    ii, jj = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, n, block):
        stop = min(start + block, n)
        # |a - b|^2 <= radius  <=>  a.b >= (|a|^2 + |b|^2 - radius) / 2
        dots = proj[start:stop] @ proj[start:].T
        dots -= 0.5 * sq[start:stop, None]
        dots -= 0.5 * sq[None, start:]
        r, c = np.nonzero(dots >= -0.5 * radius)
        upper = c > r  # columns are offset by ``start`` like the rows
        ii.append(r[upper] + start)
        jj.append(c[upper] + start)
    i = np.concatenate(ii).astype(np.int64)
    j = np.concatenate(jj).astype(np.int64)
    sims = np.einsum("ij,ij->i", vectors[i], vectors[j])
    ok = sims >= threshold
    return i[ok], j[ok], sims[ok].astype(np.float32)


def find_duplicates(
    images: np.ndarray, labels: dict[str, np.ndarray], threshold: float = 0.98, block: int = 2048
) -> DedupResult:
    """Group exact and near duplicates; see the module docstring."""
    n = len(images)
    exact = exact_groups(images)
    reps = np.unique(exact, return_index=True)[1]  # first row of each exact group
    i, j, s = near_pairs(scaled_unit_vectors(images[reps]), threshold, block)
    # graph over rows: exact copies link to their representative, near pairs link reps
    rows = np.concatenate([reps[exact], reps[i]])
    cols = np.concatenate([np.arange(n), reps[j]])
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max() + 1, n, np.int64)
    np.minimum.at(first, comp, np.arange(n))
    rep = first[comp]  # kept row of each row's group
    keep = np.flatnonzero(rep == np.arange(n))
    kind = np.full(n, "", dtype="<U5")
    removed = rep != np.arange(n)
    same_pixels = exact == exact[rep]
    kind[removed & same_pixels] = "exact"
    kind[removed & ~same_pixels] = "near"
    # similarity of each removed row to its kept row (for the figure)
    vec = scaled_unit_vectors(images[removed])
    vrep = scaled_unit_vectors(images[rep[removed]])
    similarity = np.ones(n, np.float32)
    similarity[removed] = np.einsum("ij,ij->i", vec, vrep)
    conflict = np.zeros(n, bool)
    fields = {}
    for name, values in labels.items():
        lo = np.full(n, np.iinfo(np.int64).max)
        hi = np.full(n, np.iinfo(np.int64).min)
        np.minimum.at(lo, rep, values.astype(np.int64))
        np.maximum.at(hi, rep, values.astype(np.int64))
        differs = hi[keep] > lo[keep]
        fields[name] = int(differs.sum())
        conflict[keep[differs]] = True
    return DedupResult(
        group=comp,
        keep=keep,
        kind=kind,
        rep=rep,
        conflict_groups=np.flatnonzero(conflict),
        conflict_fields=fields,
        similarity=similarity,
    )
