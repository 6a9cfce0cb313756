"""What a run folder records beside its weights: ``calibration.json`` (temperatures and
the flip setting, tied to the weights they were fitted on by the weights' hash) and the
figures a packaged model carries (``provenance.json``). :mod:`faceattrs.bundle` reads a
run through these; ``faceattrs calibrate`` writes the calibration.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .checkpoint import check_weights
from .exceptions import FaceattrsError

log = logging.getLogger(__name__)

BEST = "best"  # the multitask checkpoint of a run folder
CALIBRATION_FILE = "calibration.json"  # temperatures, written by `faceattrs calibrate`


def weights_id(run_dir: str | Path, name: str = BEST) -> str | None:
    """Short SHA-256 of ``NAME.safetensors``: ties a calibration to the weights it was fitted on."""
    path = Path(run_dir) / f"{name}.safetensors"
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_temperatures(run_dir: str | Path) -> dict[str, float]:
    """``{head: T}`` from ``RUN/calibration.json``; ``{}`` when the run is not calibrated, or
    was calibrated for other weights (a warning says so)."""
    return read_calibration(run_dir)[0]


def read_calibration(run_dir: str | Path) -> tuple[dict[str, float], bool]:
    """``({head: T}, flip_tta)`` from ``RUN/calibration.json``; ``({}, False)`` when the run
    is not calibrated, or was calibrated for other weights (a warning says so)."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.exists():
        return {}, False
    try:
        saved = json.loads(path.read_text())
        temps = {str(k): float(v) for k, v in saved["temperatures"].items()}
        bad = {k: v for k, v in temps.items() if not 0 < v < float("inf")}  # NaN too
        if bad:
            raise ValueError(f"temperatures must be positive numbers, got {bad}")
        flip = saved.get("flip_tta", False)
        if not isinstance(flip, bool):
            raise ValueError(f"flip_tta must be true or false, got {flip!r}")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise FaceattrsError(
            f"{path} is not a calibration file ({e}); delete it or rerun `faceattrs calibrate`"
        ) from None
    if saved.get("weights_sha256") not in (None, weights_id(run_dir)):
        check_weights(Path(run_dir) / f"{BEST}.safetensors")  # damaged, not retrained: say that
        log.warning(
            "%s was fitted for other weights (retrained?): ignored; rerun `faceattrs calibrate`",
            path,
        )
        return {}, False
    return temps, flip


def recorded_figures(folder: str | Path) -> dict:
    """The figures a model folder records beyond ``best.json`` (for an ensemble, which has
    no per-head validation figures of its own): ``validation_mean_macro_f1`` (``{"value",
    "n"}``: the heads' mean macro-F1 on the whole validation split, from
    ``calibration.json``, with the flip setting calibrate chose) and ``packaging_check``
    (``provenance.json``'s check, written when a model is packaged: accuracy on the first
    512 validation faces, recomputed by a test to show the shipped weights are the ones
    packaged; a check of the files, not a measure of the model). What is absent is left out.
    """
    folder, out = Path(folder), {}
    cal = json_or_none(folder / CALIBRATION_FILE) or {}
    scores = (cal.get("flip_tta_selection") or {}).get("val_score") or {}
    score = scores.get("flip" if cal.get("flip_tta") else "plain")
    if isinstance(score, int | float):
        heads = cal.get("heads") if isinstance(cal.get("heads"), dict) else {}
        n = next(
            (v["val"].get("n") for v in heads.values() if isinstance(v.get("val"), dict)), None
        )
        out["validation_mean_macro_f1"] = {"value": score, "n": n}
    check = (json_or_none(folder / "provenance.json") or {}).get("check")
    if isinstance(check, dict):
        out["packaging_check"] = check
    return out


def json_or_none(path: Path) -> dict | None:
    """A JSON object from ``path``; None when it is absent, unreadable or not one."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None
