"""Evaluate a trained multitask model on a split (or every row of an external CSV).

Writes ``metrics.json`` (accuracy, macro-F1, per-class precision / recall / F1, confusion
matrices, gender ROC AUC, calibration error, per-group fairness, ``n``), ``predictions.npz``
and the figures: confusion matrices (counts and row-normalised), gender ROC, reliability
diagrams, fairness bars and a captioned grid of faces with mistakes in red.

Command: ``faceattrs evaluate --model runs/paper`` (the test split of the run's data,
results in ``runs/paper/eval``); ``faceattrs evaluate --model runs/paper --data other.csv
--split all --out runs/paper/eval_other`` judges every row of a file the model never saw.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from . import bootstrap as BS
from . import metrics as M
from .backends import OnnxAgeModel, in_batches
from .bundle import NAMED_MODELS, resolve
from .dataset import FaceSet
from .devices import check_device
from .exceptions import FaceattrsError
from .io import write_json_atomic, write_with
from .labels import ETHNICITIES, GENDERS
from .model import predict
from .postprocess import softmax
from .predict import load_models
from .settings import InferenceSettings

log = logging.getLogger(__name__)

HEAD_LETTER = {"gender": "G", "ethnicity": "E"}  # caption prefixes, as in the reference grid


def head_letter(head: str) -> str:
    """The caption prefix of a head (``G``, ``E``; other heads: their first letter)."""
    return HEAD_LETTER.get(head, head[:1].upper())


MIN_GROUP = 20  # groups smaller than this are shown but left out of the fairness gap


def resolve_device(device: str | None) -> str:
    """``device`` checked (one-line ConfigError for a bad or absent one); None or
    ``auto``: cuda when available, else cpu."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    return device


def default_out(model_dir: str | Path | None, stage: str, split: str = "test") -> Path:
    """``RUN/eval`` for the test split, ``RUN/eval_val`` / ``RUN/eval_all`` otherwise; for
    the bundled model (``None``), the same names in the current folder (never the package)."""
    return Path(model_dir or ".") / (stage if split == "test" else f"{stage}_{split}")


def data_path(model_dir: str | Path, data: str | Path | None) -> Path:
    """``--data`` when given, else the ``"data"`` recorded in the run's ``config.json``."""
    if data is not None:
        return Path(data)
    return resolve(model_dir).recorded_data()


def load_data(model_dir: str | Path, data: str | Path | None, split: str) -> FaceSet:
    """Faces to evaluate: ``split='all'`` reads a CSV or a photo folder as is (no dedup, no
    split). The model is resolved first, so a mistyped one is one line before any data is
    read; a photo folder is read in the model's input format (size, colour, framing)."""
    from . import prepare  # the data stage; imported late so this module loads without it

    bundle = resolve(model_dir)
    path = data_path(bundle, data)
    if not path.exists():
        hint = "" if data is not None else " (the path recorded with the model): pass --data"
        raise FaceattrsError(f"data not found: {path}{hint}")
    spec = bundle.input
    prepared = path.is_dir() and (path / "faces.npz").exists()
    if split == "all" and not prepared:
        faces = prepare.read_csv_unsplit(path, spec=spec if path.is_dir() else None)
        _require(faces, spec, path)
        return faces
    cfg = prepare.PrepareConfig(image_size=spec.size, channels=spec.channels, crop=spec.crop)
    faces = prepare.load_faces(path, cfg if path.is_dir() else None)
    _require(faces, spec, path)
    if split == "all":
        log.warning("--split all on a prepared folder includes its training rows")
    elif len(faces.indices(split)) == 0:
        raise FaceattrsError(f"{path} has no {split!r} rows; for an external CSV use --split all")
    return faces


def _require(faces: FaceSet, spec, path: Path) -> None:
    """The data in the model's format; for 48x48 grayscale data and another model, the hint
    names the bundled model made for it."""
    try:
        faces.require(spec, str(path))
    except FaceattrsError as e:
        if (
            tuple(faces.images.shape[1:]) == (48, 48)
            and (NAMED_MODELS["utk48"] / "best.json").exists()
        ):
            raise FaceattrsError(f"{e}; for 48x48 grayscale faces use --model utk48") from None
        raise


def head_metrics(y: np.ndarray, logits: np.ndarray, names, temperature: float | None) -> dict:
    """Classification report, ECE (raw and, when calibrated, after scaling) and AUC if binary."""
    probs = softmax(logits)
    out = M.classification_report(y, probs.argmax(1), names)
    out["ece"] = M.expected_calibration_error(probs, y)
    out["reliability"] = M.reliability_bins(probs, y)
    if temperature is not None:
        scaled = softmax(logits, temperature)
        out["temperature"] = temperature
        out["ece_calibrated"] = M.expected_calibration_error(scaled, y)
        out["reliability_calibrated"] = M.reliability_bins(scaled, y)
    # answering only the most confident faces, ranked by the probabilities users see
    out["selective"] = M.selective(y, softmax(logits, temperature or 1.0))
    if len(names) == 2:
        curve = M.binary_roc(y, probs[:, 1])
        out["auc"] = None if curve is None else round(curve["auc"], 4)
        out["roc"] = curve
    return out


def _fairness_tasks(faces: FaceSet, pred: dict[str, np.ndarray]) -> dict:
    return {
        "gender_accuracy": (M.accuracy, faces.gender, pred["gender"]),
        "ethnicity_recall": (M.macro_recall, faces.ethnicity, pred["ethnicity"]),
    }


def fairness_report(faces: FaceSet, pred: dict[str, np.ndarray], min_size: int = MIN_GROUP) -> dict:
    """Gender accuracy and ethnicity recall (macro over the classes present) per group, and
    per ethnicity age-standardised (:func:`faceattrs.metrics.standardised` over children
    0-12 and everyone older): the gap the groups' different share of children leaves out."""
    ethnicity = np.asarray(ETHNICITIES)[faces.ethnicity]
    groups = {
        "by_ethnicity": (ethnicity, ETHNICITIES),
        "by_gender": (np.asarray(GENDERS)[faces.gender], GENDERS),
        "by_age_group": (M.age_groups(faces.age), M.age_group_names()),
    }
    strata = M.age_groups(faces.age, M.STANDARD_AGE_EDGES)
    out = {}
    for task, (fn, y, p) in _fairness_tasks(faces, pred).items():
        out[task] = {
            name: M.per_group(fn, y, p, g, order, min_size) for name, (g, order) in groups.items()
        }
        out[task]["by_ethnicity_age_standardised"] = M.standardised(
            fn, y, p, ethnicity, strata, ETHNICITIES, min_size,
            M.age_group_names(M.STANDARD_AGE_EDGES),
        )  # fmt: skip
    return out


def fairness_cross(faces: FaceSet, pred: dict[str, np.ndarray]) -> dict:
    """Gender accuracy and ethnicity recall in every (ethnicity, age group) cell."""
    ethnicity, ages = np.asarray(ETHNICITIES)[faces.ethnicity], M.age_groups(faces.age)
    return {
        task: M.cross_tab(fn, y, p, ethnicity, ages, ETHNICITIES, M.age_group_names())
        for task, (fn, y, p) in _fairness_tasks(faces, pred).items()
    }


def confidence_intervals(
    sub: FaceSet,
    logits: dict[str, np.ndarray],
    heads: list[str],
    resamples: int,
    seed: int = 0,
    fairness: dict | None = None,
) -> dict:
    """95 % intervals of the headline figures, ``{"gender.accuracy": [low, high], ...}``
    (keys: the figure's path in ``metrics.json``): percentile bootstrap over the faces
    (:func:`faceattrs.bootstrap.bootstrap_ci`, ``resamples`` resamples, seeded). A gap's
    interval is that of the difference between the two groups it names (``gap_between``,
    kept fixed). The test split has a few thousand faces: a figure within its interval's
    half-width of a target is not shown to miss it by this split alone, nor to meet it."""
    out = {"level": 0.95, "resamples": resamples, "method": "percentile bootstrap over faces"}

    def ci(stat, *data):
        return BS.bootstrap_ci(stat, *data, resamples=resamples, seed=seed)

    for head in heads:
        y, z = sub.labels[head], logits[head]
        out[f"{head}.accuracy"] = ci(BS.boot_accuracy, y, z.argmax(1))
        out[f"{head}.macro_f1"] = ci(BS.boot_macro_f1, y, z.argmax(1))
        if z.shape[1] == 2:  # the logit margin ranks faces as the probability does
            out[f"{head}.auc"] = ci(BS.boot_auc, y, z[:, 1] - z[:, 0])
    if fairness is not None:
        correct = (logits["gender"].argmax(1) == sub.gender).astype(np.int8)
        stratum = M.age_group_codes(sub.age, M.STANDARD_AGE_EDGES)
        for name, stat, data in (
            ("by_ethnicity", BS.boot_pair_gap, (correct, sub.ethnicity)),
            ("by_ethnicity_age_standardised", BS.boot_standardised_pair_gap,
             (correct, sub.ethnicity, stratum)),
        ):  # fmt: skip
            pair = fairness["gender_accuracy"][name]["gap_between"]
            if pair:
                low, high = (ETHNICITIES.index(g) for g in pair)
                out[f"fairness.gender_accuracy.{name}.max_gap"] = ci(stat(low, high), *data)
    return out


def captions(
    probs: dict[str, np.ndarray], faces: FaceSet, names: dict
) -> list[list[tuple[str, bool]]]:
    """``[("Pred G: Female (0.98) | True: Female", True), ("Pred E: ...", False)]`` per face."""
    out = []
    for i in range(len(faces)):
        lines = []
        for head in probs:
            letter = head_letter(head)
            k, true = int(probs[head][i].argmax()), int(faces.labels[head][i])
            text = f"Pred {letter}: {names[head][k]} ({probs[head][i, k]:.2f}) | True: {names[head][true]}"
            lines.append((text, k == true))
        out.append(lines)
    return out


def evaluate_run(
    model_dir: str | Path,
    faces: FaceSet,
    split: str,
    out_dir: str | Path,
    device: str = "cpu",
    n_grid: int = 24,
    seed: int = 0,
    min_group: int = MIN_GROUP,
    dtype: str = "fp32",
    resamples: int = BS.BOOTSTRAP_RESAMPLES,
) -> dict:
    """Evaluate the run's ``best`` checkpoint on ``faces.subset(split)``; write files to ``out_dir``.

    Returns the ``metrics.json`` dict. Probabilities in captions are temperature-scaled
    when the run is calibrated (as prediction will show them); labels, accuracy, F1 and
    AUC do not depend on the temperature. ``dtype="int8"``: ``model_dir`` is an int8 ONNX
    export (None: the one bundled), run on onnxruntime as prediction runs it.
    ``resamples``: bootstrap resamples of the 95 % intervals (``metrics.json["ci95"]``,
    and ``["age"]["ci95"]``); 0: none.
    """
    # matplotlib: loaded only when figures are drawn
    from .plots import evaluate as plots

    sub = faces.subset(split)
    if len(sub) == 0:
        raise FaceattrsError(f"no rows in split {split!r} to evaluate")
    age_model = None
    if dtype == "int8":
        bundle, logits, age_model = _int8_outputs(model_dir, sub.images)
        model_dir, names = bundle.path, bundle.heads
    else:
        bundle = resolve(model_dir)
        model, meta = bundle.load_multitask(device)
        model_dir, names = bundle.source, meta["class_names"]
        logits = predict(model, sub.images)
    out_dir = Path(out_dir)
    temps = bundle.temperatures
    result = {"model": str(model_dir), "split": split, "n": len(sub), "calibrated": bool(temps)}
    result["precision"] = dtype
    heads = [h for h in bundle.heads if h in sub.labels]  # the heads the data has labels for
    if not heads:
        raise FaceattrsError(f"the data has labels for none of the heads {list(bundle.heads)}")
    for head in heads:
        result[head] = head_metrics(sub.labels[head], logits[head], names[head], temps.get(head))
    pred = {h: logits[h].argmax(1) for h in heads}
    # the fairness views are specific: gender accuracy and ethnicity recall by ethnicity,
    # gender and age group (the reference's question), not one per head
    if {"gender", "ethnicity"} <= set(heads):
        result["fairness"] = fairness_report(sub, pred, min_group)
        result["fairness_by_ethnicity_and_age"] = fairness_cross(sub, pred)
    if resamples:
        result["ci95"] = confidence_intervals(
            sub, logits, heads, resamples, seed, result.get("fairness")
        )
    result["figures"] = _figures(plots, result, sub, logits, temps, names, out_dir, n_grid, seed)
    age = _evaluate_age(bundle, faces, split, out_dir, age_model, resamples)
    if age is not None:
        result["age"] = age
    write_npz(
        out_dir / "predictions.npz",
        index=faces.indices(split),
        names=sub.names.astype(str),
        **{f"{h}_logits": logits[h] for h in pred},
        **{f"{h}_true": sub.labels[h] for h in pred},
    )
    write_json_atomic(out_dir / "metrics.json", result)
    ci = result.get("ci95") or {}

    def shown(head: str, key: str, label: str) -> str:
        value, span = result[head].get(key), ci.get(f"{head}.{key}")
        if value is None:
            return ""
        return f" {label} {value:.4f}" + (f" ({span[0]:.3f}-{span[1]:.3f})" if span else "")

    scores = " | ".join(
        head + shown(head, "accuracy", "acc") + shown(head, "macro_f1", "F1")
        + shown(head, "auc", "AUC")
        for head in heads
    )  # fmt: skip
    what = " (95 % intervals in parentheses)" if ci else ""
    log.info("%s (n=%d)%s: %s -> %s", split, len(sub), what, scores, out_dir / "metrics.json")
    return result


def _figures(plots, result, sub, logits, temps, names, out_dir, n_grid, seed) -> dict[str, str]:
    """Write every figure into ``out_dir``; returns ``{name: file name}``."""
    figs = {}
    heads = [h for h in names if h in result]
    for head in heads:
        r = result[head]
        figs[f"confusion_{head}"] = plots.confusion(
            r["confusion"], names[head], out_dir / f"confusion_{head}.png", head.capitalize()
        )
        figs[f"reliability_{head}"] = plots.reliability(
            r["reliability"],
            r.get("reliability_calibrated"),
            out_dir / f"reliability_{head}.png",
            f"{head} reliability (n={r['n']})",
            (r["ece"], r["ece_calibrated"]) if "ece_calibrated" in r else (r["ece"],),
        )
    for head in heads:
        if result[head].get("roc") is not None:
            path = out_dir / f"roc_{head}.png"
            figs[f"roc_{head}"] = plots.roc(result[head]["roc"], path, f"{head.capitalize()} ROC")
    figs["selective"] = plots.selective(
        {h: result[h]["selective"] for h in heads}, out_dir / "selective.png"
    )
    if "fairness" in result:
        figs["fairness"] = plots.fairness(result["fairness"], out_dir / "fairness.png")
        figs["fairness_by_ethnicity_and_age"] = plots.fairness_cross(
            result["fairness_by_ethnicity_and_age"],
            out_dir / "fairness_by_ethnicity_and_age.png",
            result["fairness"]["gender_accuracy"]["by_ethnicity"]["min_size"],
        )
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(sub), size=min(n_grid, len(sub)), replace=False))
    shown = sub.take(pick)
    probs = {h: softmax(logits[h][pick], temps.get(h, 1.0)) for h in heads}
    figs["faces"] = plots.face_grid(
        shown.images,
        captions(probs, shown, names),
        out_dir / "faces.png",
        title=f"{len(pick)} random {result['split']} faces (mistakes in red)",
    )
    return {k: Path(v).name for k, v in figs.items()}


def _evaluate_age(
    bundle, faces: FaceSet, split: str, out_dir: Path, age_model=None, resamples: int = 0
):
    """The age model's metrics (``faceattrs.age.evaluate_age``) when the bundle holds one,
    for ``metrics.json["age"]``; its figures land in ``out_dir/age`` where the report
    finds them. None without an age model. ``age_model``: an export's
    (:class:`faceattrs.backends.OnnxAgeModel`) instead of the bundle's folder."""
    from .age import evaluate_age  # the age stage sits above this one

    if age_model is not None:
        return evaluate_age(age_model, faces, split, out_dir / "age", resamples=resamples)
    if bundle.age_dir is None:
        return None
    return evaluate_age(bundle.age_dir, faces, split, out_dir / "age", resamples=resamples)


def _int8_outputs(model, images: np.ndarray, batch: int = 256):
    """``(bundle, logits per head, age model or None)`` of an int8 export on ``images``."""

    backend = load_models(model, InferenceSettings(backend="onnx", dtype="int8"))
    logits = in_batches(backend.logits, images, batch)
    age = OnnxAgeModel(backend) if backend.age_meta is not None else None
    return backend.bundle, logits, age


def write_npz(path: Path, **arrays) -> None:
    write_with(path, lambda p: np.savez_compressed(p, **arrays))
