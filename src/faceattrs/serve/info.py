"""What ``GET /model`` says about the loaded model (:func:`model_info`)."""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..exceptions import FaceattrsError
from .limits import ServeConfig


def model_info(analyzer, cfg: ServeConfig) -> dict:
    """Heads and classes, age bins, provenance and recorded metrics of the loaded model.

    ``checkpoint`` and ``metrics`` are what the model folder records: for one network,
    ``best.json``'s epoch, score and validation accuracy / macro-F1 per head; for an
    ensemble (``faceattrs ensemble``), each member's epoch and score, the whole validation
    split's mean macro-F1 (``calibration.json``) and the packaging check (``provenance.json``).
    For an ONNX export, those of the run folder it was exported from, when it is here.
    ``licence``: the terms a model folder records (``provenance.json``; the bundled models:
    non-commercial research only, as their training faces), else None."""
    # run_folder imports the checkpoint module (torch): here, where a model is loaded
    # (faceattrs.serve imports light)
    from ..run_folder import json_or_none, recorded_figures

    models = analyzer.models
    bundle = getattr(models, "bundle", None)
    source = bundle.source if bundle is not None else getattr(models, "source", None)
    if source is not None:
        source = Path(source).resolve()  # an export's "../run" is relative to the export
    meta = _checkpoint_meta(models, bundle)
    info = {
        "faceattrs": __version__,
        "source": str(source) if source is not None else cfg.model,
        "backend": analyzer.backend,
        "dtype": getattr(analyzer.models, "precision", None) or cfg.dtype,
        "heads": {h: list(n) for h, n in models.class_names.items()},
        "input": analyzer.input.to_dict(),  # the faces the model takes (its input contract)
        "temperatures": dict(getattr(models, "temperatures", {}) or {}),
        "age": {"bins": list(models.bin_labels)} if models.bin_labels else None,
        "checkpoint": _checkpoint(meta),
        "metrics": {"validation": _head_metrics(meta.get("val") or {}, models.class_names)},
        "limits": {
            "max_upload_bytes": cfg.max_upload_bytes,
            "max_pixels": cfg.max_pixels,
            "max_images": cfg.max_images,
            "queue_size": cfg.queue_size,
        },
    }
    info["licence"] = None
    if source is not None:
        info["licence"] = (json_or_none(source / "provenance.json") or {}).get("licence")
        if not info["metrics"]["validation"]:  # none in best.json: an ensemble
            info["metrics"].update(recorded_figures(source))
        m = json_or_none(source / "eval" / "metrics.json")
        if m:
            test = info["metrics"]["test"] = {"split": m.get("split"), "n": m.get("n")}
            test.update(_head_metrics(m, models.class_names))
            if isinstance(m.get("age"), dict) and "mae" in m["age"]:
                test["age_mae"] = m["age"]["mae"]
    return info


def _checkpoint_meta(models, bundle) -> dict:
    """The multitask checkpoint's settings (``best.json``); for an export, those of the run
    folder it was exported from ({} when that folder is not here)."""
    meta = getattr(models, "meta", None)
    if isinstance(meta, dict):
        return meta
    if bundle is not None and bundle.kind == "onnx":
        try:
            return bundle.torch_bundle().meta
        except FaceattrsError:
            return {}
    return {}


def _checkpoint(meta: dict) -> dict:
    """One network: its epoch, score and monitor; an ensemble: each member's."""
    out = {k: meta[k] for k in ("epoch", "score", "monitor") if k in meta}
    members = meta.get("members")
    if isinstance(members, list) and members:
        out["members"] = [
            {k: m[k] for k in ("run", "epoch", "score") if k in m}
            for m in members
            if isinstance(m, dict)
        ]
    return out


def _head_metrics(d: dict, heads) -> dict:
    """Accuracy and macro-F1 of each of the model's ``heads`` that ``d`` has figures for."""
    return {
        h: {k: d[h][k] for k in ("accuracy", "macro_f1") if k in d[h]}
        for h in heads
        if isinstance(d.get(h), dict)
    }
