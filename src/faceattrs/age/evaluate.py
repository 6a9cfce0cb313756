"""Age metrics (pure functions) and ``evaluate_age``: every routing, the oracle and the
direct head on one split, with figures.

>>> m = regression_metrics(np.array([20, 30, 40]), np.array([22.0, 30.0, 50.0]))
>>> m["mae"], m["median_ae"], m["cs5"]
(4.0, 2.0, 0.6667)
>>> mae(np.array([1, 2]), np.array([2, 4]))
1.5
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..bootstrap import BOOTSTRAP_RESAMPLES, boot_accuracy, boot_cs, boot_mae, bootstrap_ci
from ..bundle import load_age_model
from ..checkpoint import CheckpointError
from ..dataset import FaceSet
from ..exceptions import FaceattrsError
from ..io import write_json_atomic, write_with
from ..labels import ETHNICITIES, GENDERS
from ..metrics import classification_report, per_group
from ..postprocess import conformal_interval
from . import conformal
from .bins import assign_bins

log = logging.getLogger(__name__)

GRID_SIZE = 16  # faces in the captioned test grid


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error in years (0.0 for no faces)."""
    d = np.abs(np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64))
    return _r(d.mean()) if len(d) else 0.0


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, within: float = 5.0) -> dict:
    """MAE, median absolute error and CS(5): the share of faces within ``within`` years."""
    d = np.abs(np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64))
    if not len(d):
        return {"mae": None, "median_ae": None, "cs5": None, "n": 0}
    return {
        "mae": _r(d.mean()),
        "median_ae": _r(np.median(d)),
        "cs5": _r((d <= within).mean()),
        "n": int(len(d)),
    }


def group_maes(
    age: np.ndarray, pred: np.ndarray, gender: np.ndarray, ethnicity: np.ndarray
) -> dict:
    """MAE per ethnicity and per gender (``metrics.per_group`` format, gap over groups >= 20)."""
    eth = np.asarray(ETHNICITIES, dtype=object)[ethnicity]
    gen = np.asarray(GENDERS, dtype=object)[gender]
    return {
        "mae_per_ethnicity": per_group(mae, age, pred, eth, ETHNICITIES, min_size=20),
        "mae_per_gender": per_group(mae, age, pred, gen, GENDERS, min_size=20),
    }


def age_metrics(
    pred: dict,
    age: np.ndarray,
    gender: np.ndarray,
    ethnicity: np.ndarray,
    edges,
    labels: list[str],
    routing: str,
    approach: str,
    clip: tuple[float, float] = (-np.inf, np.inf),
) -> dict:
    """All age figures from ``AgeModel.predict_all`` output and the true labels.

    The oracle routes each face to its true bin's regressor (clipped like the others).
    For an age model that is the direct head alone (no ``"per_bin"`` in ``pred``) the
    main figures are the direct head's, and the two-stage ones (``mae_hard``,
    ``mae_soft``, ``mae_oracle_bins``) are None.
    """
    true_bin = assign_bins(age, edges)
    two_stage = "per_bin" in pred
    if two_stage:
        oracle = np.clip(pred["per_bin"][np.arange(len(age)), true_bin], *clip)
        main, probs = pred[routing], pred["bin_probabilities"]
    else:
        main, probs = pred["direct"], pred["direct_bin_probabilities"]
    reg = regression_metrics(age, main)
    report = classification_report(true_bin, probs.argmax(1), labels)
    per_bin = {}
    for k, label in enumerate(labels):
        m = true_bin == k
        row = {"n": int(m.sum())}
        if two_stage:
            row["hard"] = mae(age[m], pred["hard"][m])
            row["soft"] = mae(age[m], pred["soft"][m])
            row["oracle"] = mae(age[m], oracle[m])
        if "direct" in pred:
            row["direct"] = mae(age[m], pred["direct"][m])
        per_bin[label] = row
    out = {
        "n": int(len(age)),
        "approach": approach,
        "routing": routing if two_stage else None,
        "mae": reg["mae"],
        "mae_hard": mae(age, pred["hard"]) if two_stage else None,
        "mae_soft": mae(age, pred["soft"]) if two_stage else None,
        "mae_oracle_bins": mae(age, oracle) if two_stage else None,
        "median_ae": reg["median_ae"],
        "cs5": reg["cs5"],
        "bin_accuracy": _r(report["accuracy"]),
        "bin_macro_f1": _r(report["macro_f1"]),
        "bin_report": report,
        "mae_per_bin": per_bin,
        **group_maes(age, main, gender, ethnicity),
        "direct": None,
        "bin_labels": list(labels),
        "edges": [float(e) for e in edges],
    }
    if "direct" in pred:
        d_report = classification_report(
            true_bin, pred["direct_bin_probabilities"].argmax(1), labels
        )
        out["direct"] = {
            **regression_metrics(age, pred["direct"]),
            "bin_accuracy": _r(d_report["accuracy"]),
            "bin_macro_f1": _r(d_report["macro_f1"]),
            **group_maes(age, pred["direct"], gender, ethnicity),
        }
    out["default_mae"] = out["direct"]["mae"] if approach == "direct" else out["mae"]
    return out


def age_intervals(pred: dict, age: np.ndarray, model, resamples: int, seed: int = 0) -> dict:
    """95 % percentile-bootstrap intervals (faces resampled) of the figures
    :func:`age_metrics` reports on top: ``mae``, ``default_mae``, ``cs5`` and
    ``bin_accuracy``, each of the same predictions."""
    two_stage = "per_bin" in pred
    main = pred[model.routing] if two_stage else pred["direct"]
    probs = pred["bin_probabilities"] if two_stage else pred["direct_bin_probabilities"]
    default = pred["direct"] if model.approach == "direct" else main
    true_bin = assign_bins(age, model.edges)

    def ci(stat, *data):
        return bootstrap_ci(stat, *data, resamples=resamples, seed=seed)

    return {
        "level": 0.95,
        "resamples": resamples,
        "method": "percentile bootstrap over faces",
        "mae": ci(boot_mae, age, main),
        "default_mae": ci(boot_mae, age, default),
        "cs5": ci(boot_cs, age, main),
        "bin_accuracy": ci(boot_accuracy, true_bin, probs.argmax(1)),
    }


def evaluate_age(
    model,
    faces: FaceSet,
    split: str = "test",
    out_dir: str | Path | None = None,
    figures: bool = True,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict:
    """Evaluate an age model on one split of ``faces``; the dict for ``metrics.json["age"]``.

    ``model``: an :class:`~faceattrs.age.networks.AgeModel` (or an object with its
    ``predict_all`` and settings: :class:`faceattrs.backends.OnnxAgeModel`) or a model
    folder (age run, or a multitask run holding ``age/``). ``split``: 'train', 'val', 'test' or 'all'. With
    ``out_dir`` it writes ``age_predictions_<split>.npz`` there and, with ``figures``, the
    PNGs (scatter, MAE per bin and per group, bin confusion, captioned grid) plus
    ``age_metrics.json`` next to them. ``resamples``: bootstrap resamples of the 95 %
    intervals of the MAE, CS@5 and bin accuracy (``"ci95"``); 0: none.
    """
    if not hasattr(model, "predict_all"):  # a folder (or a bundle): load its age model
        loaded = load_age_model(model)
        if loaded is None:
            raise CheckpointError(f"{model}: no age model in this bundle")
        model = loaded
    sub = faces.take(faces.indices(split))
    if len(sub) == 0:
        raise FaceattrsError(f"no faces in split {split!r}")
    pred = model.predict_all(sub.images)
    age = sub.age.astype(np.float64)
    metrics = age_metrics(
        pred,
        age,
        sub.gender,
        sub.ethnicity,
        model.edges,
        model.bin_labels,
        model.routing,
        model.approach,
        model.clip,
    )
    metrics["split"] = split
    if resamples:
        metrics["ci95"] = age_intervals(pred, age, model, resamples, seed)
    metrics["interval"] = None
    if model.interval is not None:
        direct = model.approach == "direct"
        value = pred["direct"] if direct else pred[model.routing]
        probs = pred["direct_bin_probabilities" if direct else "bin_probabilities"]
        low, high = conformal_interval(value, probs.argmax(1), model.interval)
        metrics["interval"] = {
            "alpha": model.interval["alpha"],
            **conformal.coverage(age, low, high),
            "per_bin": {
                label: conformal.coverage(age[m], low[m], high[m])
                for label, m in (
                    (label, assign_bins(age, model.edges) == k)
                    for k, label in enumerate(model.bin_labels)
                )
            },
        }
    if out_dir is not None:
        out_dir = Path(out_dir)
        grid = np.random.default_rng(seed).choice(len(sub), min(GRID_SIZE, len(sub)), replace=False)
        npz = out_dir / f"age_predictions_{split}.npz"
        _save_npz(
            npz,
            age=age,
            gender=sub.gender,
            ethnicity=sub.ethnicity,
            true_bin=assign_bins(age, model.edges),
            grid_index=grid,
            grid_images=sub.images[grid],
            edges=np.asarray(model.edges, np.float64),
            **{k: v for k, v in pred.items() if k != "embedding"},
        )
        if figures:
            # matplotlib: loaded only when figures are drawn
            from ..plots import age as ageplots

            write_json_atomic(out_dir / "age_metrics.json", metrics)
            ageplots.plot_all(npz, metrics, out_dir)
    return metrics


def _save_npz(path: Path, **arrays) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, **arrays)

    write_with(path, write)


def _r(x: float) -> float:
    return round(float(x), 4)
