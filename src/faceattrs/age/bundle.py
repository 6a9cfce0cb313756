"""The age model bundle: saving, loading and prediction.

An age run folder holds::

    age.json               bins, labels, default approach and routing, clip range, the
                           path of its multitask model, validation figures behind the choice
    coarse.safetensors/.json       6-way bin classifier (FaceResNet, head "age_bin")
    regressors.safetensors         one small regressor per bin (BinRegressors)
    direct.safetensors/.json       the direct age head (FaceResNet, head "age"), optional
    config.json, *_history.jsonl, metrics.json, figures/

``resolve_bundle`` lets every command accept either a multitask run or an age run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, load_model, read_meta, save_checkpoint
from ..engine import predict as engine_predict
from ..io import write_json_atomic, write_with
from ..metrics import softmax
from ..model import FaceResNet
from . import direct as directmod
from .bins import bin_labels
from .regress import BinRegressors, route

AGE_JSON = "age.json"
FORMAT = "faceattrs-age-1"
COARSE_HEAD = "age_bin"
APPROACHES = ("two_stage", "direct")


@dataclass
class AgeModel:
    """Two-stage age model (coarse bins + per-bin regressors), optionally with the direct head.

    ``predict(images)`` uses the default ``approach`` (and, for the two-stage model, the
    default ``routing``); ``predict_all`` returns every variant for evaluation.
    """

    coarse: FaceResNet
    regressors: BinRegressors
    edges: np.ndarray
    routing: str = "soft"
    approach: str = "two_stage"
    direct: FaceResNet | None = None
    clip: tuple[float, float] = (1.0, 100.0)
    batch_size: int = 512

    @property
    def bin_labels(self) -> list[str]:
        return bin_labels(self.edges)

    @property
    def n_bins(self) -> int:
        return len(self.edges) + 1

    @property
    def device(self) -> torch.device:
        return next(self.coarse.parameters()).device

    def to(self, device) -> AgeModel:
        for m in (self.coarse, self.regressors, self.direct):
            if m is not None:
                m.to(device)
        return self

    def _clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, *self.clip)

    def two_stage(self, images) -> dict[str, np.ndarray]:
        """``(N, 48, 48)`` uint8 -> bin probabilities ``(N, K)``, per-bin ages ``(N, K)``,
        hard- and soft-routed ages ``(N,)`` and the embedding ``(N, D)``."""
        out = engine_predict(self.coarse, images, self.batch_size, embed=True)
        probs = softmax(out[COARSE_HEAD])
        with torch.no_grad():
            z = torch.as_tensor(out["embedding"], device=self.device)
            per_bin = self.regressors.eval()(z).double().cpu().numpy()
        return {
            "bin_probabilities": probs,
            "per_bin": per_bin,
            "hard": self._clip(route(probs, per_bin, "hard")),
            "soft": self._clip(route(probs, per_bin, "soft")),
            "embedding": out["embedding"],
        }

    def direct_predict(self, images) -> dict[str, np.ndarray]:
        """Expected age ``(N,)`` and bin probabilities ``(N, K)`` (per-year mass summed per bin)."""
        if self.direct is None:
            raise CheckpointError("this age model has no direct head")
        logits = engine_predict(self.direct, images, self.batch_size)[directmod.HEAD]
        probs = softmax(logits)
        value = probs @ np.arange(probs.shape[1], dtype=np.float64)
        return {
            "value": self._clip(value),
            "bin_probabilities": directmod.year_probs_to_bins(probs, self.edges),
        }

    def predict_all(self, images) -> dict[str, np.ndarray]:
        out = self.two_stage(images)
        if self.direct is not None:
            d = self.direct_predict(images)
            out["direct"] = d["value"]
            out["direct_bin_probabilities"] = d["bin_probabilities"]
        return out

    def predict(self, images, approach: str | None = None, routing: str | None = None) -> dict:
        """``{"value": (N,) years, "bin": (N,) int, "bin_probabilities": (N, K)}``.

        ``bin`` is the most probable bin (from the coarse classifier, or from the direct
        head's per-year distribution when that is the approach).
        """
        approach = approach or self.approach
        if approach == "direct":
            d = self.direct_predict(images)
            value, probs = d["value"], d["bin_probabilities"]
        elif approach == "two_stage":
            t = self.two_stage(images)
            value, probs = t[routing or self.routing], t["bin_probabilities"]
        else:
            raise CheckpointError(f"unknown age approach {approach!r}; use one of {APPROACHES}")
        return {
            "value": value.astype(np.float64),
            "bin": probs.argmax(1),
            "bin_probabilities": probs,
        }


def save_age_model(
    age_dir: str | Path, model: AgeModel, multitask_dir: str | Path, info: dict
) -> Path:
    """Write the weights, then ``age.json`` (last: it marks the bundle complete; an old
    one is removed first, so a kill in between never pairs it with new weights)."""
    age_dir = Path(age_dir)
    age_dir.mkdir(parents=True, exist_ok=True)
    (age_dir / AGE_JSON).unlink(missing_ok=True)
    edges = [float(e) for e in model.edges]
    save_checkpoint(
        age_dir,
        "coarse",
        model.coarse,
        {"age_edges": edges, "class_names": {COARSE_HEAD: model.bin_labels}},
    )
    state = {k: v.detach().cpu().contiguous() for k, v in model.regressors.state_dict().items()}
    write_with(age_dir / "regressors.safetensors", lambda p: save_file(state, str(p)))
    if model.direct is not None:
        save_checkpoint(age_dir, "direct", model.direct, {"age_edges": edges})
    mt = Path(multitask_dir).resolve()
    meta = {
        "format": FORMAT,
        "multitask": os.path.relpath(mt, age_dir.resolve()),
        "multitask_absolute": str(mt),
        "edges": edges,
        "bin_labels": model.bin_labels,
        "approach": model.approach,
        "routing": model.routing,
        "clip": list(model.clip),
        "regressors": model.regressors.settings(),
        "direct": model.direct is not None,
        **info,
    }
    write_json_atomic(age_dir / AGE_JSON, meta)
    return age_dir / AGE_JSON


def resolve_bundle(path: str | Path) -> tuple[Path, Path | None]:
    """A multitask run or an age run -> ``(multitask_run_dir, age_dir or None)``.

    - an age run folder (holds ``age.json``): its multitask model is the folder named in
      ``age.json`` (relative path first, then the absolute path recorded at training);
    - a multitask run folder (holds ``best.json``): its age model is ``RUN/age`` when that
      holds ``age.json``, otherwise None.
    """
    path = Path(path)
    if path.is_file() and path.name == AGE_JSON:
        path = path.parent
    if path.is_dir() and (path / AGE_JSON).exists():
        meta = _read_age_json(path)
        cands = [
            path / meta[k] if k == "multitask" else Path(meta[k])
            for k in ("multitask", "multitask_absolute")
            if meta.get(k)
        ]
        for cand in cands:
            if (cand / "best.json").exists():
                return cand.resolve(), path
        raise CheckpointError(
            f"{path}: its multitask model is missing (looked for {path / meta.get('multitask', '')} "
            f"and {meta.get('multitask_absolute')}); keep the age run next to its multitask run"
        )
    if path.is_dir() and (path / "best.json").exists():
        age = path / "age"
        return path, (age if (age / AGE_JSON).exists() else None)
    if path.is_file():
        return path, None  # a checkpoint file: checkpoint.load_model decides
    raise CheckpointError(
        f"{path}: not a model folder (expected best.json from `faceattrs train` or age.json "
        "from `faceattrs train-age`)"
    )


def load_age_model(run_dir: str | Path, device: str | torch.device = "cpu") -> AgeModel | None:
    """The age model of a model bundle (an age run, or a multitask run with ``age/``), or None."""
    _, age_dir = resolve_bundle(run_dir)
    if age_dir is None:
        return None
    meta = _read_age_json(age_dir)
    try:
        coarse, _ = load_model(age_dir, "coarse", device)
        rs = meta["regressors"]
        reg = BinRegressors(rs["dim"], rs["n_bins"], rs["hidden"], rs["dropout"])
        weights = age_dir / "regressors.safetensors"
        if not weights.exists():
            raise CheckpointError(f"age regressor weights missing: {weights}")
        reg.load_state_dict(load_file(str(weights)))
        direct = load_model(age_dir, "direct", device)[0] if meta.get("direct") else None
        model = AgeModel(
            coarse=coarse,
            regressors=reg.to(device).eval(),
            edges=np.asarray(meta["edges"]),
            routing=meta["routing"],
            approach=meta["approach"],
            direct=direct,
            clip=tuple(meta["clip"]),
        )
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{age_dir}: inconsistent age model: {e}") from None
    if model.approach == "direct" and direct is None:
        raise CheckpointError(f"{age_dir}: default approach is 'direct' but direct.* is missing")
    return model


def read_age_meta(age_dir: str | Path) -> dict:
    return _read_age_json(Path(age_dir))


def _read_age_json(age_dir: Path) -> dict:
    meta = read_meta(age_dir / AGE_JSON)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{age_dir / AGE_JSON}: not an age model ({meta.get('format')!r})")
    return meta
