"""The losses of a training run, ``loss_fn(outputs, batch) -> (loss, {head: part})``:
:func:`heads_loss` (weighted cross-entropy per head), :func:`multitask_loss` (the
reference's, from the settings), :func:`distill_loss` (soft targets of teacher runs),
:func:`with_age_head` (the age head's term); and the teachers' soft targets
(:func:`teacher_targets`), kept in the run folder for a resume
(:func:`teacher_targets_cached`, :func:`save_teacher_targets`)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..age.bins import assign_bins
from ..age.direct import HEAD as AGE_HEAD
from ..age.direct import expected_age
from ..checkpoint import load_model
from ..exceptions import FaceattrsError
from ..io import write_with
from ..model import predict
from ..prepare import file_sha256
from .config import AGE_YEARS, HEADS, TrainConfig, TrainError, class_heads

log = logging.getLogger(__name__)


def heads_loss(weights: dict[str, float], smoothing: dict[str, float] | None = None):
    """``loss_fn(outputs, batch) -> (sum of weight x CE per head, {head: CE})``, one term per
    head of ``weights`` (``batch[head]``: long class indices)."""
    smoothing = smoothing or {}

    def loss_fn(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        parts = {
            h: F.cross_entropy(outputs[h], batch[h], label_smoothing=smoothing.get(h, 0.0))
            for h in weights
        }
        return sum(weights[h] * parts[h] for h in weights), parts

    return loss_fn


def multitask_loss(cfg: TrainConfig, heads=None):
    """The weighted cross-entropies of the classification ``heads`` (names; default
    ``cfg.heads``), each with its spec's weight and smoothing (a head without a spec:
    weight 1, no smoothing): the reference's L = 0.4 CE(gender) + 2.5 CE(ethnicity).
    With ``cfg.teachers``, see :func:`distill_loss`."""
    specs = {h.name: h for h in cfg.heads}
    heads = list(class_heads(cfg) if heads is None else heads)
    weights = {h: specs[h].weight if h in specs else 1.0 for h in heads}
    smoothing = {h: specs[h].smoothing if h in specs else 0.0 for h in heads}
    if cfg.teachers:
        return distill_loss(weights, smoothing, cfg.distill_weight, cfg.distill_temperature)
    return heads_loss(weights, smoothing)


def distill_loss(weights, smoothing, alpha: float, temperature: float):
    """Per head: ``weight x ((1 - alpha) CE + alpha T^2 KL(teacher_T || student_T))``, the
    teacher's probabilities at temperature T in ``batch["teacher_HEAD"]`` (Hinton et al.
    2015). A batch without them (validation) gets the plain loss."""
    plain = heads_loss(weights, smoothing)
    t = temperature

    def loss_fn(outputs, batch):
        if not all(f"teacher_{h}" in batch for h in weights):
            return plain(outputs, batch)
        parts = {}
        for h in weights:
            ce = F.cross_entropy(outputs[h], batch[h], label_smoothing=smoothing.get(h, 0.0))
            kl = F.kl_div(
                F.log_softmax(outputs[h] / t, 1), batch[f"teacher_{h}"], reduction="batchmean"
            )
            parts[h] = (1 - alpha) * ce + alpha * t * t * kl
        return sum(weights[h] * parts[h] for h in weights), parts

    return loss_fn


def with_age_head(loss_fn, cfg: TrainConfig, edges=None):
    """``loss_fn`` plus ``cfg.age_weight`` x (cross-entropy over the years, smoothed by
    ``cfg.age_smoothing``, + ``cfg.age_l1`` x the L1 error of the expected age, +
    ``cfg.age_bin`` x the cross-entropy over the age bins of inner ``edges``: minus the log
    of the year probabilities summed over the true bin), with ``"age"`` among the parts."""
    year_bin = None
    if cfg.age_bin > 0:
        if edges is None:
            raise FaceattrsError("age_bin needs the age bins' edges")
        year_bin = torch.from_numpy(assign_bins(np.arange(AGE_YEARS), edges))

    def fn(outputs, batch):
        loss, parts = loss_fn(outputs, batch)
        logits, age = outputs[AGE_HEAD], batch[AGE_HEAD]
        ce = F.cross_entropy(logits, age, label_smoothing=cfg.age_smoothing)
        age_loss = ce + cfg.age_l1 * (expected_age(logits) - age.float()).abs().mean()
        if year_bin is not None:
            yb = year_bin.to(logits.device)
            in_bin = yb[None, :] == yb[age][:, None]  # the years of each face's true bin
            logp = F.log_softmax(logits.float(), dim=1).masked_fill(~in_bin, float("-inf"))
            age_loss = age_loss - cfg.age_bin * torch.logsumexp(logp, dim=1).mean()
        return loss + cfg.age_weight * age_loss, {**parts, AGE_HEAD: age_loss}

    return fn


def teacher_targets(
    runs: str, images: torch.Tensor, temperature: float, heads: dict[str, int] = HEADS
) -> dict[str, torch.Tensor]:
    """``{"teacher_HEAD": (N, K) probabilities}`` for ``heads`` (name -> classes): the mean
    over the runs (comma-separated folders) and over face and mirror of softmax(logits /
    T), on ``images``' device."""
    folders = [r.strip() for r in runs.split(",") if r.strip()]
    sums = {h: torch.zeros(len(images), k) for h, k in heads.items()}
    faces = images  # the teachers run on the training device
    for folder in folders:
        try:
            model, _ = load_model(folder, "best", images.device)
        except (FaceattrsError, OSError) as e:
            raise TrainError(f"teacher {folder}: {e}") from None
        model.flip_tta = False
        for x in (faces, faces.flip(-1)):
            logits = predict(model, x, 512)
            for h in heads:
                sums[h] += torch.from_numpy(logits[h] / temperature).softmax(1)
    n = 2 * len(folders)
    return {f"teacher_{h}": (v / n).to(images.device) for h, v in sums.items()}


TEACHERS_FILE = "teachers.safetensors"


def teachers_key(cfg: TrainConfig, images: torch.Tensor) -> str | None:
    """What the teachers' targets depend on: the teachers' weights (file hashes), the
    temperature and the training images; None when a teacher's weights cannot be read."""
    h = hashlib.sha256(f"faceattrs-teachers-1 T={cfg.distill_temperature!r}".encode())
    if class_heads(cfg) != HEADS:  # other heads, other targets (the reference's: as before)
        h.update(repr(class_heads(cfg)).encode())
    try:
        for folder in [r.strip() for r in cfg.teachers.split(",") if r.strip()]:
            h.update(file_sha256(Path(folder) / "best.safetensors").encode())
    except OSError:
        return None  # teacher_targets names the problem
    h.update(np.ascontiguousarray(images.cpu().numpy()))  # hashed in place, no byte copy
    return h.hexdigest()


def teacher_targets_cached(
    out_dir: Path, cfg: TrainConfig, images: torch.Tensor
) -> tuple[dict[str, torch.Tensor], str | None, bool]:
    """``(targets, key, cached)``: the run folder's ``teachers.safetensors`` when it was
    made from these teachers, temperature and images (a resume), else :func:`teacher_targets`
    (minutes for wide teachers on a CPU)."""
    key = teachers_key(cfg, images)
    path = out_dir / TEACHERS_FILE
    if key is not None and path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    log.info("teachers' targets read from %s", path)
                    return {k: f.get_tensor(k).to(images.device) for k in f.keys()}, key, True
        except Exception:  # unreadable or foreign: computed again and rewritten
            pass
    soft = teacher_targets(cfg.teachers, images, cfg.distill_temperature, class_heads(cfg))
    return soft, key, False


def save_teacher_targets(out_dir: Path, soft: dict[str, torch.Tensor], key: str | None) -> None:
    if key is None:
        return
    state = {k: v.detach().cpu().contiguous() for k, v in soft.items()}
    write_with(out_dir / TEACHERS_FILE, lambda p: save_file(state, str(p), {"key": key}))
