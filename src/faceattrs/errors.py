"""Error clustering: what the misclassified test faces of one head (ethnicity, the
reference's; ``--head`` any head of the model the data has labels for) have in common.

The shared embeddings (512-d at full width) of the misclassified test faces are grouped
by k-means (k = 3, seeded, as in the reference); each cluster is described by measured
numbers, never by eye: size, true- and predicted-class mix, the commonest confusions,
mean brightness (mean pixel, 0-255), contrast (per-face pixel standard deviation) and
left-right asymmetry (mean |face - mirrored face|, a rough proxy for a turned head or
side lighting), each next to the same figure over the whole split. A PCA projection
shows the clusters in 2-D.

Command: ``faceattrs errors --model runs/paper`` -> ``runs/paper/errors/clusters.json``,
``montage.png``, ``pca.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from .bundle import resolve
from .dataset import FaceSet
from .exceptions import FaceattrsError
from .io import write_json_atomic
from .model import predict

log = logging.getLogger(__name__)


def cluster_embeddings(emb: np.ndarray, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means on ``(N, D)`` embeddings -> ``(labels (N,), distance of each row to its centre)``."""
    if len(emb) < k:
        raise FaceattrsError(
            f"only {len(emb)} misclassified faces: need at least k = {k} to cluster"
        )
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(emb)
    dist = np.linalg.norm(emb - km.cluster_centers_[km.labels_], axis=1)
    return km.labels_.astype(int), dist


def image_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per face: ``brightness`` (mean pixel), ``contrast`` (pixel std), ``asymmetry``, 0-255 scale.

    >>> s = image_stats(np.array([[[0, 100], [0, 100]]], dtype=np.uint8))
    >>> s["brightness"].tolist(), s["contrast"].tolist(), s["asymmetry"].tolist()
    ([50.0], [50.0], [100.0])
    """
    x = np.asarray(images, dtype=np.float64).reshape(len(images), *np.shape(images)[1:])
    return {
        "brightness": x.mean(axis=(1, 2)),
        "contrast": x.std(axis=(1, 2)),
        "asymmetry": np.abs(x - x[:, :, ::-1]).mean(axis=(1, 2)),
    }


def _mix(labels: np.ndarray, names) -> dict[str, int]:
    """Counts per class name, commonest first, absent classes left out."""
    counts = np.bincount(labels, minlength=len(names))
    return {names[i]: int(counts[i]) for i in np.argsort(-counts, kind="stable") if counts[i]}


def _stat(values: np.ndarray) -> dict[str, float]:
    return {"mean": round(float(values.mean()), 2), "sd": round(float(values.std()), 2)}


def describe_text(cl: dict, ref: dict) -> str:
    """A short description from the measured numbers (threshold: 0.25 SD of the split)."""

    def word(key: str, low: str, high: str, mid: str) -> str:
        diff = (cl[key]["mean"] - ref[key]["mean"]) / max(ref[key]["sd"], 1e-9)
        return f"{low if diff < -0.25 else high if diff > 0.25 else mid} ({diff:+.1f} SD)"

    true_top, pred_top = next(iter(cl["true"])), next(iter(cl["predicted"]))
    return (
        f"{word('brightness', 'darker', 'lighter', 'medium brightness')}, "
        f"{word('contrast', 'low contrast', 'high contrast', 'medium contrast')}, "
        f"{word('asymmetry', 'symmetric', 'asymmetric', 'typical symmetry')}; "
        f"true mostly {true_top} ({cl['true'][true_top] / cl['size']:.0%}), "
        f"predicted mostly {pred_top} ({cl['predicted'][pred_top] / cl['size']:.0%})"
    )


def describe_clusters(
    labels, dist, images, true, pred, names, reference: dict, n_examples: int = 10
) -> list[dict]:
    """One dict per cluster: size, class mixes, confusions, image statistics, example rows.

    ``examples`` are row positions (into the inputs) of the faces nearest the cluster centre.
    """
    stats = image_stats(images)
    out = []
    for k in range(int(labels.max()) + 1):
        rows = np.flatnonzero(labels == k)
        pairs = [f"{names[t]} -> {names[p]}" for t, p in zip(true[rows], pred[rows], strict=True)]
        conf, counts = np.unique(pairs, return_counts=True)
        cl = {
            "cluster": k,
            "size": int(len(rows)),
            "share": round(len(rows) / len(labels), 4),
            "true": _mix(true[rows], names),
            "predicted": _mix(pred[rows], names),
            "confusions": {
                str(c): int(n)
                for c, n in sorted(zip(conf, counts, strict=True), key=lambda t: -t[1])
            },
            **{key: _stat(v[rows]) for key, v in stats.items()},
            "examples": rows[np.argsort(dist[rows], kind="stable")][:n_examples].tolist(),
        }
        cl["description"] = describe_text(cl, reference)
        out.append(cl)
    return out


def project_2d(emb: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """PCA to 2-D -> ``(points (N, 2), explained-variance ratios)``."""
    pca = PCA(n_components=2, random_state=seed).fit(emb)
    return pca.transform(emb), [round(float(v), 4) for v in pca.explained_variance_ratio_]


def cluster_errors(
    model_dir: str | Path,
    faces: FaceSet,
    out_dir: str | Path,
    k: int = 3,
    seed: int = 0,
    split: str = "test",
    device: str = "cpu",
    n_examples: int = 10,
    head: str = "ethnicity",
) -> dict:
    """Cluster the misclassified faces of ``split`` by ``head``; write clusters.json and
    figures."""
    # matplotlib: loaded only when figures are drawn
    from .plots import evaluate as plots

    out_dir, sub = Path(out_dir), faces.subset(split)
    bundle = resolve(model_dir)
    if head not in bundle.heads or head not in faces.labels:
        have = [h for h in bundle.heads if h in faces.labels]
        raise FaceattrsError(
            f"head {head!r}: the model and the data share the heads {', '.join(have) or 'none'}"
        )
    model, meta = bundle.load_multitask(device)
    names = meta["class_names"][head]
    res = predict(model, sub.images, embed=True)
    pred = res[head].argmax(1)
    wrong = np.flatnonzero(pred != sub.labels[head])
    emb, imgs, true, wpred = (
        res["embedding"][wrong],
        sub.images[wrong],
        sub.labels[head][wrong],
        pred[wrong],
    )
    labels, dist = cluster_embeddings(emb, k, seed)
    reference = {key: _stat(v) for key, v in image_stats(sub.images).items()}
    clusters = describe_clusters(labels, dist, imgs, true, wpred, names, reference, n_examples)
    points, explained = project_2d(emb, seed)
    index = faces.indices(split)[wrong]
    for cl in clusters:
        cl["examples"] = [int(index[i]) for i in cl["examples"]]
    montage = [
        {
            "images": faces.images[cl["examples"]],
            "title": f"cluster {cl['cluster']} (n={cl['size']}): {cl['description']}",
        }
        for cl in clusters
    ]
    plots.cluster_montage(montage, out_dir / "montage.png", per_row=n_examples)
    plots.pca_scatter(points, labels, true, names, out_dir / "pca.png", explained)
    result = {
        "split": split,
        **({} if head == "ethnicity" else {"head": head}),  # the reference's: as before
        "k": k,
        "seed": seed,
        "n": len(sub),
        "n_errors": int(len(wrong)),
        "error_rate": round(len(wrong) / max(len(sub), 1), 4),
        "embedding_dim": int(emb.shape[1]),
        "reference": reference,
        "clusters": clusters,
        "pca_explained_variance": explained,
        "samples": [
            {
                "index": int(index[i]),
                "name": str(sub.names[wrong[i]]),
                "cluster": int(labels[i]),
                "true": names[true[i]],
                "predicted": names[wpred[i]],
                "pc": points[i].round(4).tolist(),
            }
            for i in range(len(wrong))
        ],
        "figures": {"montage": "montage.png", "pca": "pca.png"},
    }
    write_json_atomic(out_dir / "clusters.json", result)
    for cl in clusters:
        log.info("cluster %d (n=%d): %s", cl["cluster"], cl["size"], cl["description"])
    return result
