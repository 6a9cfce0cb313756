"""Calibration: temperature scaling (its scores: :mod:`faceattrs.metrics`, expected
calibration error and reliability bins) and the flip test-time augmentation choice.

One temperature per head is fitted on the validation split (minimum negative
log-likelihood, a bounded 1-D search), saved as ``calibration.json`` in the run folder
and applied at prediction time through :func:`load_temperatures`. Dividing logits by a
positive temperature never changes the predicted class (nor the gender ROC), only how
confident the probabilities are.

Command: ``faceattrs calibrate --model runs/paper`` (validation split of the run's data).

The same step decides flip test-time augmentation (``--flip-tta auto``, the default): the
logits of each face and of its mirror image are averaged when that raises the validation
score (mean macro-F1 of the heads, the training's selection metric); the choice and both
scores are saved in ``calibration.json`` and the temperatures are fitted to the logits
that prediction will use.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from .age import conformal
from .age.bins import quantile_edges
from .age.config import AgeConfig
from .age.direct import HEAD as AGE_HEAD
from .age.networks import AGE_JSON, save_head_age_model
from .age.networks import choose_flip_tta as choose_age_flip_tta
from .bundle import resolve
from .dataset import FaceSet
from .exceptions import FaceattrsError
from .io import write_json_atomic
from .metrics import N_BINS, expected_calibration_error, reliability_bins
from .model import predict
from .postprocess import AGE_POINTS, age_prediction, softmax
from .run_folder import CALIBRATION_FILE, weights_id

log = logging.getLogger(__name__)

T_BOUNDS = (0.05, 20.0)  # search range of the temperature


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``y_true`` under ``softmax(logits / T)``.

    >>> round(nll(np.array([[0.0, 0.0]]), np.array([1])), 4)  # log 2
    0.6931
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    y_true = np.asarray(y_true)
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(z)), y_true]))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, bounds=T_BOUNDS) -> float:
    """The temperature T minimising validation NLL of ``softmax(logits / T)``.

    NLL is convex in 1 / T, hence unimodal in log T, so a bounded scalar search finds the
    global minimum; no gradient or learning rate to tune.
    """
    if len(logits) == 0:
        raise FaceattrsError("cannot fit a temperature on no samples")
    res = minimize_scalar(
        lambda log_t: nll(logits, y_true, float(np.exp(log_t))),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return round(float(np.exp(res.x)), 4)


def calibration_summary(
    logits: np.ndarray, y_true: np.ndarray, t: float, n_bins: int = N_BINS
) -> dict:
    """ECE, NLL and reliability bins before (T = 1) and after scaling by ``t``."""
    before, after = softmax(logits), softmax(logits, t)
    return {
        "n": int(len(y_true)),
        "ece_before": expected_calibration_error(before, y_true, n_bins),
        "ece_after": expected_calibration_error(after, y_true, n_bins),
        "nll_before": round(nll(logits, y_true), 4),
        "nll_after": round(nll(logits, y_true, t), 4),
        "bins_before": reliability_bins(before, y_true, n_bins),
        "bins_after": reliability_bins(after, y_true, n_bins),
    }


def load_temperatures(model) -> dict[str, float]:
    """``{head: T}`` of a bundle (``{}`` when not calibrated, or calibrated for other
    weights); see :func:`faceattrs.run_folder.read_temperatures`. Apply with
    :func:`apply_temperatures` (a head missing from the dict keeps T = 1)."""
    return resolve(model).temperatures


def apply_temperatures(
    logits: dict[str, np.ndarray], temps: dict[str, float]
) -> dict[str, np.ndarray]:
    """Probabilities per head: ``softmax(logits[head] / temps.get(head, 1))``.

    Pass head logits only (drop ``"embedding"`` from :func:`faceattrs.model.predict`'s result).

    >>> p = apply_temperatures({"gender": np.array([[0.0, 2.0]])}, {"gender": 2.0})
    >>> p["gender"].round(4).tolist()
    [[0.2689, 0.7311]]
    """
    return {head: softmax(z, temps.get(head, 1.0)) for head, z in logits.items()}


FLIP_TTA_CHOICES = ("auto", "on", "off")


def val_score(logits: dict[str, np.ndarray], faces: FaceSet, heads) -> float:
    """Mean macro-F1 of ``heads`` (the training's model-selection score)."""
    # scikit-learn: a training library, kept off the inference path (tests/test_layers.py)
    from sklearn.metrics import f1_score

    f1 = [
        f1_score(faces.labels[h], logits[h].argmax(1), average="macro", zero_division=0)
        for h in heads
    ]
    return round(float(np.mean(f1)), 4)


def selecting(meta: dict, heads: list[str]) -> list[str]:
    """The ``heads`` that count in the training's selection score, as the checkpoint's
    settings record them (``config.heads[].selects``); all of them when not recorded.

    >>> selecting({"config": {"heads": [{"name": "smile", "selects": False}]}}, ["gender", "smile"])
    ['gender']
    """
    specs = (meta.get("config") or {}).get("heads") or []
    off = {h.get("name") for h in specs if isinstance(h, dict) and h.get("selects") is False}
    return [h for h in heads if h not in off] or heads


def choose_flip_tta(model, val: FaceSet, heads, mode: str = "auto") -> tuple[bool, dict]:
    """Whether to average each face's logits with its mirror image's: ``mode`` "on"/"off",
    or "auto" = when it raises the validation score. Returns ``(choice, scores)``."""
    return _flip_choice(model, val, heads, mode)[:2]


def _flip_choice(model, val: FaceSet, heads, mode: str) -> tuple[bool, dict, dict]:
    """:func:`choose_flip_tta`, plus the validation logits of the choice (for reuse)."""
    if mode not in FLIP_TTA_CHOICES:
        raise FaceattrsError(f"flip_tta must be one of {', '.join(FLIP_TTA_CHOICES)}, got {mode!r}")
    scores, logits = {}, {}
    for flip in (False, True):
        model.flip_tta = flip
        logits[flip] = predict(model, val.images)
        scores["flip" if flip else "plain"] = val_score(logits[flip], val, heads)
    choice = {"on": True, "off": False}.get(mode, scores["flip"] > scores["plain"])
    model.flip_tta = choice
    return choice, {"mode": mode, "val_score": scores}, logits[choice]


def calibrate_run(
    model_dir: str | Path,
    faces: FaceSet,
    n_bins: int = N_BINS,
    device: str = "cpu",
    flip_tta: str = "auto",
) -> dict:
    """Choose flip TTA (:func:`choose_flip_tta`) and fit one temperature per head on the
    validation rows of ``faces``; save and plot.

    Writes ``RUN/calibration.json`` (flip-TTA choice, temperatures, and ECE / NLL /
    reliability bins before and after on validation) and
    ``RUN/calibration/reliability_HEAD.png``. The test split is not read: ``faceattrs
    evaluate --split test`` reports the held-out ECE before and after.
    """
    # matplotlib: loaded only when figures are drawn
    from .plots import evaluate as plots

    bundle = resolve(model_dir)  # an age run's temperatures live with its multitask run
    model_dir = bundle.source
    model, meta = bundle.load_multitask(device)
    val = faces.subset("val")
    if len(val) == 0:
        raise FaceattrsError(
            "the data has no validation rows: calibrate needs a prepared (split) data set"
        )
    heads = [h for h in bundle.heads if h in faces.labels]  # not a network's age head
    flip, selection, val_logits = _flip_choice(model, val, selecting(meta, heads), flip_tta)
    log.info(
        "flip TTA %s (validation score plain %.4f, flip %.4f)",
        "on" if flip else "off",
        selection["val_score"]["plain"],
        selection["val_score"]["flip"],
    )
    result = {"flip_tta": flip, "flip_tta_selection": selection}
    result.update({"temperatures": {}, "fitted_on": "val", "n_bins": n_bins, "heads": {}})
    result["weights_sha256"] = weights_id(model_dir)
    for head in heads:
        t = fit_temperature(val_logits[head], val.labels[head])
        result["temperatures"][head] = t
        if not T_BOUNDS[0] * 1.01 < t < T_BOUNDS[1] * 0.99:
            log.warning(
                "%s: T = %.3f is at the search bound %s: is the model trained?", head, t, T_BOUNDS
            )
        summary = calibration_summary(val_logits[head], val.labels[head], t, n_bins)
        result["heads"][head] = {"val": summary}
        plots.reliability(
            summary["bins_before"],
            summary["bins_after"],
            model_dir / "calibration" / f"reliability_{head}.png",
            title=f"{head} (validation, n={summary['n']}), T = {t:.2f}",
            ece=(summary["ece_before"], summary["ece_after"]),
        )
        log.info(
            "%s: T = %.3f, ECE on validation %.4f -> %.4f",
            head,
            t,
            summary["ece_before"],
            summary["ece_after"],
        )
    write_json_atomic(model_dir / CALIBRATION_FILE, result)
    if bundle.age_head and bundle.run_dir is not None and (bundle.age is None or bundle.shared_age):
        result["age"] = calibrate_age_head(bundle, faces, val_logits[AGE_HEAD], flip)
    elif bundle.age_dir is not None and bundle.age is not None:
        result["age"] = calibrate_age_flip(bundle, val, flip_tta, device)
    return result


def calibrate_age_head(bundle, faces: FaceSet, val_year_logits: np.ndarray, flip: bool) -> dict:
    """A network with its own age head: write ``RUN/age/age.json`` (bins from the
    checkpoint's ``age_edges``, else training-age sextiles; clip to ``AgeConfig``'s 1..100;
    the point estimate, mean or median of the head's year distribution, whichever has the
    lower validation MAE; the 90 % split-conformal interval fitted on the validation ages
    the network now predicts, with the flip choice of the other heads, since one pass
    serves all three)."""

    val = faces.subset("val")
    edges = bundle.meta.get("age_edges")
    if edges is None:
        edges = quantile_edges(faces.subset("train").age, 6).tolist()
    clip = (AgeConfig.min_age, AgeConfig.max_age)  # the age models' range, as train-age's
    preds = {
        point: age_prediction(
            "direct", year_logits=val_year_logits, edges=edges, clip=clip, point=point
        )
        for point in AGE_POINTS
    }
    maes = {k: round(float(np.abs(v["value"] - val.age).mean()), 4) for k, v in preds.items()}
    point = min(AGE_POINTS, key=lambda k: (maes[k], k != "mean"))  # a tie keeps the mean
    pred = preds[point]
    interval = conformal.fit(val.age, pred["value"], pred["bin"], len(edges) + 1)
    info = {"selection": {"val_mae": maes[point]}, "point_selection": {"val_mae": maes}}
    save_head_age_model(bundle.run_dir / "age", edges, clip, interval, flip, info, point)
    log.info(
        "age head: the %s of its year distribution (validation MAE mean %.3f, median %.3f); "
        "90 %% interval refitted",
        point,
        maes["mean"],
        maes["median"],
    )
    return {"flip_tta": flip, "head": True, "point": point, "val_mae": maes[point]}


def calibrate_age_flip(bundle, val: FaceSet, mode: str = "auto", device: str = "cpu") -> dict:
    """Choose flip TTA for the bundle's age model on validation (lower MAE of its default
    approach), refit its 90 % interval to the predictions it will make, and rewrite its
    ``age.json`` (one atomic write: the weights do not change)."""
    model = bundle.load_age(device)
    choice, selection = choose_age_flip_tta(model, val, mode)
    log.info(
        "age flip TTA %s (validation MAE plain %.3f, flip %.3f)",
        "on" if choice else "off",
        selection["val_mae"]["plain"],
        selection["val_mae"]["flip"],
    )
    meta = {**bundle.age, "flip_tta": choice, "flip_tta_selection": selection}
    meta["interval"] = model.interval
    write_json_atomic(bundle.age_dir / AGE_JSON, meta)
    return {"flip_tta": choice, **selection}
