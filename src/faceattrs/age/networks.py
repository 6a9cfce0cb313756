"""The age model bundle: saving, loading and prediction.

An age run folder holds::

    age.json               bins, labels, default approach and routing, clip range, the
                           path of its multitask model, validation figures behind the choice
    coarse.safetensors/.json       6-way bin classifier (FaceResNet, head "age_bin")
    regressors.safetensors         one small regressor per bin (BinRegressors)
    direct.safetensors/.json       the direct age head (FaceResNet, head "age"), optional
    config.json, *_history.csv, metrics.json, figures/

or, for a multitask network that has the age head itself (three heads: gender, ethnicity,
age; ``"direct": "multitask"`` in ``age.json``), only ``age.json``: bins, clip range,
interval. That age model is the direct head of the multitask network, run in the same
pass as the other heads (:func:`save_head_age_model`).

Loading (and resolving ``--model`` to an age run) is :mod:`faceattrs.bundle`'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, load_model, load_weights, read_meta, save_checkpoint
from ..io import write_json_atomic, write_with
from ..model import FaceResNet
from ..model import predict as predict_faces
from ..postprocess import AGE_POINTS, APPROACHES, age_prediction, route, softmax
from . import conformal
from . import direct as directmod
from .bins import bin_labels
from .regress import BinRegressors

AGE_JSON = "age.json"
FORMAT = "faceattrs-age-1"
COARSE_HEAD = "age_bin"


@dataclass
class AgeModel:
    """Two-stage age model (coarse bins + per-bin regressors), optionally with the direct head;
    or the direct head alone (``coarse`` and ``regressors`` None).

    ``predict(images)`` uses the default ``approach`` (and, for the two-stage model, the
    default ``routing``); ``predict_all`` returns every variant for evaluation.
    ``shared``: ``direct`` is the multitask network itself (its ``age`` head); then
    ``flip_tta`` is the bundle's calibration choice (one pass serves every head).
    """

    coarse: FaceResNet | None
    regressors: BinRegressors | None
    edges: np.ndarray
    routing: str = "soft"
    approach: str = "two_stage"
    direct: FaceResNet | None = None
    clip: tuple[float, float] = (1.0, 100.0)
    batch_size: int = 512
    interval: dict | None = None  # split-conformal half-widths (age.conformal), fitted on val
    flip_tta: bool = False  # average face and mirror image (chosen on val: choose_flip_tta)
    shared: bool = False  # direct is the multitask network's age head
    point: str = "mean"  # the direct head's age: "mean" or "median" (chosen on val: calibrate)

    @property
    def two_stage_ok(self) -> bool:
        return self.coarse is not None and self.regressors is not None

    @property
    def bin_labels(self) -> list[str]:
        return bin_labels(self.edges)

    @property
    def n_bins(self) -> int:
        return len(self.edges) + 1

    @property
    def device(self) -> torch.device:
        return next((self.coarse or self.direct).parameters()).device

    def to(self, device) -> AgeModel:
        for m in (self.coarse, self.regressors, self.direct):
            if m is not None:
                m.to(device)
        return self

    def _clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, *self.clip)

    def _per_bin(self, embedding: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = torch.as_tensor(embedding, device=self.device)
            return self.regressors.eval()(z).double().cpu().numpy()

    def _two_stage_raw(self, images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bin logits, per-bin ages (face and mirror averaged when ``flip_tta``) and the
        face's own embedding."""
        if not self.two_stage_ok:
            raise CheckpointError("this age model is the direct head alone: no two-stage model")
        if not self.flip_tta:
            out = predict_faces(self.coarse, images, self.batch_size, embed=True)
            return out[COARSE_HEAD], self._per_bin(out["embedding"]), out["embedding"]
        # faces and mirror images in one pass (one batch for a single face)
        images = np.asarray(images)
        n = len(images)
        both = np.concatenate([images, _mirror(images)])
        out = predict_faces(self.coarse, both, self.batch_size, embed=True)
        logits, per_bin = out[COARSE_HEAD], self._per_bin(out["embedding"])
        return (logits[:n] + logits[n:]) / 2, (per_bin[:n] + per_bin[n:]) / 2, out["embedding"][:n]

    def two_stage_outputs(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Coarse bin logits ``(N, K)`` and each bin's regressor's age ``(N, K)``."""
        return self._two_stage_raw(images)[:2]

    def two_stage(self, images) -> dict[str, np.ndarray]:
        """``(N, 48, 48)`` uint8 -> bin probabilities ``(N, K)``, per-bin ages ``(N, K)``,
        hard- and soft-routed ages ``(N,)`` and the embedding ``(N, D)``."""
        logits, per_bin, embedding = self._two_stage_raw(images)
        probs = softmax(logits)
        return {
            "bin_probabilities": probs,
            "per_bin": per_bin,
            "hard": self._clip(route(probs, per_bin, "hard")),
            "soft": self._clip(route(probs, per_bin, "soft")),
            "embedding": embedding,
        }

    def _direct_logits(self, images) -> np.ndarray:
        if self.direct is None:
            raise CheckpointError("this age model has no direct head")
        if self.shared:  # the multitask network mirrors by itself when told to
            before, self.direct.flip_tta = self.direct.flip_tta, self.flip_tta
            try:
                return predict_faces(self.direct, images, self.batch_size)[directmod.HEAD]
            finally:
                self.direct.flip_tta = before
        if not self.flip_tta:
            return predict_faces(self.direct, images, self.batch_size)[directmod.HEAD]
        images = np.asarray(images)
        both = np.concatenate([images, _mirror(images)])
        logits = predict_faces(self.direct, both, self.batch_size)[directmod.HEAD]
        return (logits[: len(images)] + logits[len(images) :]) / 2

    def direct_predict(self, images) -> dict[str, np.ndarray]:
        """The direct head's age ``(N,)`` (its ``point``: mean or median of the years) and bin
        probabilities ``(N, K)`` (per-year mass summed per bin)."""
        logits = self._direct_logits(images)
        out = age_prediction(
            "direct", edges=self.edges, clip=self.clip, year_logits=logits, point=self.point
        )
        return {"value": out["value"], "bin_probabilities": out["bin_probabilities"]}

    def predict_all(self, images) -> dict[str, np.ndarray]:
        """Every variant: the two-stage outputs (:meth:`two_stage`, when the model has them)
        and ``"direct"`` / ``"direct_bin_probabilities"`` (when it has the direct head)."""
        out = self.two_stage(images) if self.two_stage_ok else {}
        if self.direct is not None:
            d = self.direct_predict(images)
            out["direct"] = d["value"]
            out["direct_bin_probabilities"] = d["bin_probabilities"]
        return out

    def predict(self, images, approach: str | None = None, routing: str | None = None) -> dict:
        """``{"value": (N,) years, "bin": (N,) int, "bin_probabilities": (N, K)}``
        (:func:`faceattrs.postprocess.age_prediction`, shared with the ONNX backend)."""
        approach = approach or self.approach
        kw = {"edges": self.edges, "clip": self.clip, "routing": routing or self.routing}
        if approach == self.approach and routing in (None, self.routing):
            kw["interval"] = self.interval  # fitted for the default approach and routing only
        if approach == "direct":
            logits = self._direct_logits(images)
            return age_prediction("direct", year_logits=logits, point=self.point, **kw)
        if approach != "two_stage":
            raise CheckpointError(f"unknown age approach {approach!r}; use one of {APPROACHES}")
        bin_logits, per_bin = self.two_stage_outputs(images)
        return age_prediction("two_stage", bin_logits=bin_logits, per_bin=per_bin, **kw)


def save_head_age_model(
    age_dir: str | Path,
    edges,
    clip,
    interval: dict | None,
    flip_tta: bool,
    info: dict,
    point: str = "mean",
) -> Path:
    """``age.json`` alone, for a multitask network with its own ``age`` head (one atomic
    write: the weights are the multitask run's)."""
    edges = [float(e) for e in edges]
    meta = {
        "format": FORMAT,
        "multitask": "..",
        "edges": edges,
        "bin_labels": bin_labels(np.asarray(edges)),
        "approach": "direct",
        "routing": "soft",
        "clip": [float(c) for c in clip],
        "direct": "multitask",
        "interval": interval,
        "flip_tta": bool(flip_tta),
        "point": point,
        **info,
    }
    Path(age_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(age_dir) / AGE_JSON, meta)
    return Path(age_dir) / AGE_JSON


def _mirror(images) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(images)[..., ::-1])


def choose_flip_tta(model: AgeModel, val, mode: str = "auto") -> tuple[bool, dict]:
    """Average each face's age outputs with its mirror image's? ``mode`` "on" / "off", or
    "auto" = when that lowers the validation MAE of the default approach and routing.
    Sets ``model.flip_tta`` and refits the 90 % interval (split-conformal on the validation
    predictions the model will now make). Returns ``(choice, selection)``."""
    if mode not in ("auto", "on", "off"):
        raise CheckpointError(f"flip_tta must be one of auto, on, off, got {mode!r}")
    maes, preds = {}, {}
    for flip in (False, True):
        model.flip_tta = flip
        preds[flip] = model.predict(val.images)
        maes["flip" if flip else "plain"] = round(
            float(np.abs(preds[flip]["value"] - val.age).mean()), 4
        )
    choice = {"on": True, "off": False}.get(mode, maes["flip"] < maes["plain"])
    model.flip_tta = choice
    pred = preds[choice]
    model.interval = conformal.fit(val.age, pred["value"], pred["bin"], model.n_bins)
    return choice, {"mode": mode, "val_mae": maes}


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
        "interval": model.interval,
        "flip_tta": model.flip_tta,
        **info,
    }
    write_json_atomic(age_dir / AGE_JSON, meta)
    return age_dir / AGE_JSON


# ---------------------------------------------------------------- reading an age folder


def read_age_json(age_dir: Path) -> dict:
    """``age_dir``'s ``age.json``, its format, edges and clip checked."""
    meta = read_meta(age_dir / AGE_JSON)
    where = age_dir / AGE_JSON
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not an age model ({meta.get('format')!r})")
    try:
        edges = [float(e) for e in meta["edges"]]
        lo, hi = (float(c) for c in meta["clip"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad or missing age edges / clip ({e!r})") from None
    if not edges or any(np.diff(edges) <= 0) or not lo < hi:
        raise CheckpointError(
            f"{where}: age edges must increase and clip be (low, high), got {edges} / {[lo, hi]}"
        )
    return meta


def has_age_head(meta: dict) -> bool:
    """Whether the multitask network of checkpoint settings ``meta`` has an age head."""
    return directmod.HEAD in (meta.get("model") or {}).get("heads", {})


def _age_point(age_dir: Path, meta: dict) -> str:
    point = meta.get("point", "mean")  # age.json files written before the choice: the mean
    if point not in AGE_POINTS:
        raise CheckpointError(f"{age_dir}: age point {point!r} is not one of {AGE_POINTS}")
    return point


def shared_age_model(age_dir: Path, meta: dict, net: FaceResNet, flip_tta: bool) -> AgeModel:
    """The age model of a multitask network's own age head ``net`` (``age.json`` ``meta``)."""
    try:
        return AgeModel(
            coarse=None,
            regressors=None,
            edges=np.asarray(meta["edges"]),
            approach="direct",
            direct=net,
            clip=tuple(meta["clip"]),
            interval=meta.get("interval"),
            flip_tta=flip_tta,
            shared=True,
            point=_age_point(age_dir, meta),
        )
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{age_dir}: inconsistent age model: {e!r}") from None


def load_age_folder(age_dir: Path, meta: dict, device) -> AgeModel:
    """The two-stage age model of ``age_dir`` (and its direct head when saved), in eval mode."""
    try:
        coarse, _ = load_model(age_dir, "coarse", device)
        rs = meta["regressors"]
        reg = BinRegressors(rs["dim"], rs["n_bins"], rs["hidden"], rs["dropout"])
        weights = age_dir / "regressors.safetensors"
        if not weights.exists():
            raise CheckpointError(f"age regressor weights missing: {weights}")
        reg.load_state_dict(load_weights(weights))
        direct = load_model(age_dir, "direct", device)[0] if meta.get("direct") else None
        model = AgeModel(
            coarse=coarse,
            regressors=reg.to(device).eval(),
            edges=np.asarray(meta["edges"]),
            routing=meta["routing"],
            approach=meta["approach"],
            direct=direct,
            clip=tuple(meta["clip"]),
            interval=meta.get("interval"),
            flip_tta=meta.get("flip_tta", False),
            point=_age_point(age_dir, meta),
        )
        if not isinstance(model.flip_tta, bool):
            raise TypeError(f"flip_tta must be true or false, got {model.flip_tta!r}")
    except (KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else repr(e)
        raise CheckpointError(f"{age_dir}: inconsistent age model: {first}") from None
    if model.approach == "direct" and direct is None:
        raise CheckpointError(f"{age_dir}: default approach is 'direct' but direct.* is missing")
    return model
