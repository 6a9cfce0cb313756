"""``train_age``: the whole age stage, from a trained multitask run to an age run folder.

1. bins from the training ages (or explicit edges);
2. coarse 6-way classifier from the multitask backbone (head only, then fine-tuning);
3. embeddings of the frozen coarse backbone, once; one regressor per bin;
4. routing (hard or soft) chosen on validation MAE;
5. the direct head (same backbone, same schedule) and the choice of the default approach
   on validation MAE;
6. save the bundle, evaluate on validation and test, write ``metrics.json`` and figures.

Nothing is chosen on the test split.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import config as cfgmod
from ..bundle import resolve
from ..dataset import FaceSet
from ..devices import select_device
from ..exceptions import FaceattrsError
from ..io import write_json_atomic
from ..model import predict as predict_faces
from ..postprocess import ROUTINGS
from ..training.loop import evaluate_heads
from . import direct as directmod
from .bins import assign_bins, bin_labels, check_edges, quantile_edges
from .config import AgeConfig
from .evaluate import evaluate_age, mae
from .finetune import from_backbone, train_regressors, train_two_stages
from .networks import AGE_JSON, COARSE_HEAD, AgeModel, choose_flip_tta, save_age_model

log = logging.getLogger(__name__)


def train_age(
    multitask_dir: str | Path,
    faces: FaceSet,
    out_dir: str | Path,
    cfg: AgeConfig | None = None,
    device: str | None = None,
    info: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Train the age models on ``faces`` (with a train/val/test split) into ``out_dir``.

    Returns the summary written to ``out_dir/summary.json``: bins, validation figures
    behind each choice, test metrics. ``info`` (e.g. the data path) is recorded in age.json.
    An existing age run in ``out_dir`` is an error unless ``overwrite``.
    """
    cfg = cfg or AgeConfig()
    out_dir = Path(out_dir)
    if (out_dir / AGE_JSON).exists():
        if not overwrite:
            raise FaceattrsError(
                f"{out_dir} already holds an age model: choose another --out or pass --overwrite"
            )
        (out_dir / AGE_JSON).unlink()  # the bundle is incomplete until the new age.json
    out_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(device or "auto")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    mt_bundle = resolve(multitask_dir)  # a run folder (or an age run: its multitask run)
    multitask_dir = mt_bundle.source
    mt_model, mt_meta = mt_bundle.load_multitask("cpu")
    train, val = faces.subset("train"), faces.subset("val")
    if len(train) == 0 or len(val) == 0:
        raise FaceattrsError("the age stage needs faces in the train and val splits")
    write_json_atomic(out_dir / "config.json", cfgmod.to_dict(cfg))

    edges = check_edges(cfg.edges) if cfg.edges else quantile_edges(train.age, cfg.n_bins)
    labels = bin_labels(edges)
    counts = np.bincount(assign_bins(train.age, edges), minlength=len(edges) + 1)
    log.info("age bins %s, training faces per bin %s", labels, counts.tolist())

    # Coarse classifier: early stopping on validation macro-F1.
    val_bins = assign_bins(val.age, edges)

    val_data = {
        "image": torch.from_numpy(np.ascontiguousarray(val.images)).to(device),
        COARSE_HEAD: torch.from_numpy(val_bins).to(device),
    }

    def coarse_loss(out, batch):
        return F.cross_entropy(
            out[COARSE_HEAD], batch[COARSE_HEAD], label_smoothing=cfg.label_smoothing
        )

    def coarse_score(model):
        r = evaluate_heads(
            model,
            val_data,
            {COARSE_HEAD: len(labels)},
            batch_size=cfg.eval_batch_size,
            channels_last=cfg.channels_last,
        )[COARSE_HEAD]
        return {"val_macro_f1": r["macro_f1"], "val_accuracy": r["accuracy"]}

    torch.manual_seed(cfg.seed)  # the new head's initial weights
    coarse = from_backbone(mt_model, {COARSE_HEAD: len(labels)})
    targets = {COARSE_HEAD: assign_bins(train.age, edges)}
    coarse, coarse_summary = train_two_stages(
        coarse,
        coarse_loss,
        coarse_score,
        "val_macro_f1",
        "max",
        train,
        targets,
        cfg,
        device,
        mt_meta,
        out_dir / "coarse_history.csv",
        "coarse",
    )

    # Per-bin regressors on the frozen coarse embeddings, computed once.
    z_train = predict_faces(coarse, train.images, cfg.eval_batch_size, embed=True)["embedding"]
    z_val = predict_faces(coarse, val.images, cfg.eval_batch_size, embed=True)["embedding"]
    regressors, reg_summary = train_regressors(z_train, train.age, z_val, val.age, edges, cfg)
    write_json_atomic(out_dir / "regressors.json", reg_summary)
    if not cfg.clip_to_bin:
        regressors.low.fill_(-np.inf)
        regressors.high.fill_(np.inf)
    model = AgeModel(
        coarse=coarse.eval(),
        regressors=regressors.to(device),
        edges=edges,
        clip=(cfg.min_age, cfg.max_age),
        batch_size=cfg.eval_batch_size,
    )

    # Routing, then approach, chosen on validation.
    val_pred = model.two_stage(val.images)
    val_mae = {r: mae(val.age, val_pred[r]) for r in ROUTINGS}
    model.routing = min(ROUTINGS, key=lambda r: val_mae[r])
    selection = {
        "val_mae_hard": val_mae["hard"],
        "val_mae_soft": val_mae["soft"],
        "routing": model.routing,
    }
    direct_summary = None
    if cfg.direct:
        model.direct, direct_summary = _train_direct(
            mt_model, mt_meta, train, val, cfg, device, out_dir
        )
        selection["val_mae_direct"] = mae(val.age, model.direct_predict(val.images)["value"])
        better = selection["val_mae_direct"] < val_mae[model.routing]
        model.approach = "direct" if better else "two_stage"
    selection["approach"] = model.approach
    log.info("age model on validation: %s; default %s", selection, model.approach)
    # Flip TTA chosen on validation, then 90 % prediction intervals of the default approach,
    # split-conformal on the validation predictions the model makes (inside choose_flip_tta).
    selection["flip_tta"], flip_selection = choose_flip_tta(model, val, cfg.flip_tta)
    selection["val_mae_flip"] = flip_selection["val_mae"]

    save_age_model(
        out_dir,
        model,
        multitask_dir,
        {
            "selection": selection,
            "config": cfgmod.to_dict(cfg),
            "train_bin_counts": counts.tolist(),
            **(info or {}),
        },
    )
    val_metrics = evaluate_age(model, faces, "val", out_dir=None)
    test_metrics = (
        evaluate_age(model, faces, "test", out_dir=out_dir / "figures", seed=cfg.seed)
        if len(faces.indices("test"))
        else None
    )
    write_json_atomic(
        out_dir / "metrics.json",
        {"split": "test", "age": test_metrics, "val": {"age": val_metrics}},
    )
    summary = {
        "edges": [float(e) for e in edges],
        "bin_labels": labels,
        "train_bin_counts": counts.tolist(),
        "selection": selection,
        "coarse": coarse_summary,
        "regressors": reg_summary,
        "direct": direct_summary,
        "test": _headline(test_metrics),
        "val": _headline(val_metrics),
        "seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _train_direct(
    mt_model, mt_meta, train: FaceSet, val: FaceSet, cfg: AgeConfig, device, out_dir: Path
):
    """The direct head on the multitask backbone, same two-stage schedule, early-stopped on
    validation MAE."""
    loss = directmod.make_loss(cfg)

    def direct_loss(out, batch):
        return loss(out[directmod.HEAD], batch["age"])

    def direct_score(model):
        logits = predict_faces(model, val.images, cfg.eval_batch_size)[directmod.HEAD]
        value = np.clip(_expected(logits), cfg.min_age, cfg.max_age)
        return {"val_mae": mae(val.age, value)}

    torch.manual_seed(cfg.seed + 1)
    model = from_backbone(mt_model, {directmod.HEAD: directmod.n_years(cfg.max_age)})
    targets = {"age": np.clip(train.age, cfg.min_age, cfg.max_age).astype(np.float32)}
    return train_two_stages(
        model,
        direct_loss,
        direct_score,
        "val_mae",
        "min",
        train,
        targets,
        cfg,
        device,
        mt_meta,
        out_dir / "direct_history.csv",
        "direct",
    )


def _expected(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return p @ np.arange(p.shape[1], dtype=np.float64)


def _headline(m: dict | None) -> dict | None:
    if m is None:
        return None
    keys = (
        "n",
        "approach",
        "routing",
        "default_mae",
        "mae",
        "mae_hard",
        "mae_soft",
        "mae_oracle_bins",
        "median_ae",
        "cs5",
        "interval",
        "bin_accuracy",
        "bin_macro_f1",
    )
    out = {k: m[k] for k in keys}
    out["direct_mae"] = m["direct"]["mae"] if m.get("direct") else None
    return out
