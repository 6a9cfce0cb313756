"""Train the multitask (gender + ethnicity) model as the reference says.

:class:`TrainConfig` and ``PRESETS``; :func:`multitask_loss` (weighted cross-entropy per
head); :func:`save_train_state` / :func:`load_train_state` and :func:`resume_settings`
(resume without pickle). The loop and its parts (devices, inverse-frequency sampling,
AdamW with warm-up + cosine, early stopping, history rows) are :mod:`faceattrs.loop`,
shared with the age stage. :func:`fit` runs it all and writes the run folder::

    RUN/config.json        resolved config + data path
    RUN/best.{safetensors,json}, RUN/last.{safetensors,json}, RUN/last_state.safetensors
    RUN/history.csv, RUN/history.png

Run it with ``faceattrs train --data PREPARED --out runs/cpu --preset cpu``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import config as cfgmod
from .age.direct import HEAD as AGE_HEAD
from .augment import AugmentConfig, Augmenter, minority_classes
from .checkpoint import CheckpointError, read_meta, save_checkpoint
from .dataset import FaceSet
from .devices import check_device, check_device_name
from .dlib_resnet import INPUT as DLIB_INPUT
from .dlib_resnet import default_dat_path, load_dlib_weights
from .engine import evaluate_heads, train_one_epoch
from .exceptions import FaceattrsError
from .inputs import DEFAULT_HEADS
from .io import clean_stale_temps, write_json_atomic, write_with
from .loop import (  # noqa: F401  (re-exported: the training toolbox's old home)
    EarlyStopping,
    cpu_has_fast_bf16,
    epoch_order,
    lr_factor,
    make_optimizer,
    make_scheduler,
    mix_seed,
    read_history,
    run_epochs,
    sampler_weights,
    seed_epoch,
    select_device,
    use_bf16,
    write_history,
)
from .model import FaceEnsemble, FaceResNet, ModelConfig, build_model, input_settings
from .prepare import data_key

log = logging.getLogger(__name__)

# head -> number of classes, from the input contract; a checkpoint records its own
HEADS = {h: len(names) for h, names in DEFAULT_HEADS.items()}
AGE_YEARS = 117  # the age head's classes: whole years 0..116 (UTKFace's range)
BF16_WORDS = ("auto", "on", "off", "true", "false", "1", "0", "yes", "no")


class TrainError(FaceattrsError):
    """A training run that cannot start or resume (bad data, missing run folder)."""


@dataclass
class TrainConfig:
    """Settings of one training run. Defaults = the reference (the ``paper`` preset)."""

    epochs: int = 50  # maximum epochs; early stopping may end sooner
    batch_size: int = 128  # [ours] the reference does not state it
    lr: float = 6e-4  # AdamW peak learning rate
    weight_decay: float = 1e-3  # AdamW decoupled weight decay, on every parameter
    warmup_epochs: float = 5.0  # linear warm-up from ~0 to lr, then cosine to min_lr
    min_lr: float = 0.0  # floor of the cosine
    gender_weight: float = 0.4  # L = 0.4 CE(gender) + 2.5 CE(ethnicity)
    ethnicity_weight: float = 2.5
    ethnicity_smoothing: float = 0.12  # label smoothing of the ethnicity CE
    gender_smoothing: float = 0.0
    patience: int = 8  # early stopping on the mean of both macro-F1s on validation
    min_delta: float = 0.0  # smallest score gain that counts as an improvement
    width: float = 1.0  # model channel multiplier (1.0 = 64/128/256/512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)  # [ours] residual blocks per stage: 2,2,2,2 is
    # ResNet-18 (the reference), 1,1,1,1 ResNet-10; four stages, each at least 1
    dropout: float = 0.35  # before each head
    # [ours] the input contract: faces of image_size pixels in `channels` (1 gray, 3 RGB;
    # the data must hold them: `faceattrs prepare --size N --color` on photos); 48/1 is
    # the reference. stem_stride 2 halves the maps in the first layer (96-128 px faces)
    image_size: int = 48
    channels: int = 1
    stem_stride: int = 1
    arch: str = "resnet"  # [ours] the backbone: resnet (the reference's, at `width` and
    # `blocks`) or dlib_resnet (dlib's face-recognition ResNet on its 150x150 RGB chips,
    # `prepare --size 150 --color --crop dlib`; start from its weights with init=dlib)
    balanced: bool = True  # inverse-frequency ethnicity sampling (False: plain shuffle)
    seed: int = 0  # weights, sampling, augmentation and dropout all derive from it
    device: str = "auto"  # auto = cuda, then mps, then cpu; or any torch device string
    bf16: str = "auto"  # auto / on / off; auto = on for CUDA and CPUs with AVX512-BF16/AMX
    channels_last: bool = True  # memory format of model and inputs
    compile: bool = False  # torch.compile the model
    eval_batch_size: int = 512  # validation batch size
    threads: int = 0  # torch CPU threads (0 = torch's default)
    ema: float = 0.0  # [ours] per-step decay of a weight average (EMA), evaluated and saved
    # in place of the raw weights; 0 = off (the reference)
    teachers: str = ""  # [ours] distillation: comma-separated run folders whose averaged
    # predictions (face + mirror) on the training faces are soft targets; "" = off
    distill_weight: float = 0.5  # share of the soft-target term in each head's loss
    distill_temperature: float = 2.0
    age_head: bool = False  # [ours] a third head, age over whole years 0..116 (the bundle's
    # age model, one pass with the others: docs/age.md); off = the reference's two heads
    age_weight: float = 1.0  # its loss: weight x (CE with smoothing + l1 x |E[age] - age|)
    age_smoothing: float = 0.1
    age_l1: float = 0.1
    age_bin: float = 0.0  # [ours] + this x the age head's cross-entropy over the six
    # training-age bins (its year probabilities summed per bin); 0 = off
    init: str = ""  # [ours] start from these weights instead of random ones: a run folder,
    # an ensemble, "default" (the model bundled with the package) or "dlib" (arch
    # dlib_resnet: dlib's face-recognition weights, heads random); "" = random (the reference)
    init_member: int = 0  # which network of an ensemble ``init`` starts from
    limit: int = 0  # use at most this many faces per split (0 = all; smoke tests)
    max_batches: int = 0  # stop each epoch after this many batches (0 = full; smoke tests)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # override as augment.KEY

    def __post_init__(self):  # every setting's valid range, checked before any work
        c = cfgmod.check_range
        for key in ("epochs", "batch_size", "eval_batch_size", "patience"):
            c(self, key, 1)
        for key in ("threads", "limit", "max_batches", "warmup_epochs", "min_lr", "min_delta",
                    "init_member"):  # fmt: skip
            c(self, key, 0)
        for key in ("weight_decay", "gender_weight", "ethnicity_weight", "age_bin"):
            c(self, key, 0)
        if self.age_bin > 0 and not self.age_head:
            raise cfgmod.ConfigError("setting 'age_bin' needs age_head=true")
        c(self, "lr", 0, low_open=True)
        c(self, "width", 0, 16, low_open=True)
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise cfgmod.ConfigError(
                f"setting 'blocks' must be four counts of at least 1, such as 2,2,2,2; "
                f"got {','.join(map(str, self.blocks))}"
            )
        c(self, "distill_temperature", 0, low_open=True)
        try:
            model_config(self)
        except ValueError as e:
            raise cfgmod.ConfigError(str(e)) from None
        for key in ("ema", "distill_weight", "dropout", "ethnicity_smoothing", "gender_smoothing"):
            c(self, key, 0, 1, high_open=True)
        if str(self.bf16).lower() not in BF16_WORDS:
            raise cfgmod.ConfigError(f"setting 'bf16' must be auto, on or off, got {self.bf16!r}")
        check_device_name(self.device)


PRESETS: dict[str, dict[str, Any]] = {
    # the reference exactly (batch size is ours)
    "paper": {},
    # ~30 min on this shared 2-core machine (docs/training.md): 1/8 width (8..64
    # channels, 64-d embedding), 12 epochs, higher lr with a 1-epoch warm-up, patience 4,
    # one thread (two OpenMP threads crawl when other processes share the cores).
    # Trades accuracy for time; not tuned.
    "cpu": {
        "width": 0.125,
        "epochs": 12,
        "batch_size": 128,
        "lr": 2e-3,
        "warmup_epochs": 1.0,
        "patience": 4,
        "threads": 1,
    },
    # [ours] colour at 96x96 (the UTKFace chips, `prepare --size 96 --color`), a stride-2
    # stem (48x48 maps: about the cost of the 48 px model), v5's member recipe (EMA, the
    # age head, half width, 45 epochs): docs/training.md
    "rgb": {
        "image_size": 96,
        "channels": 3,
        "stem_stride": 2,
        "width": 0.5,
        "epochs": 45,
        "lr": 1.5e-3,
        "warmup_epochs": 2.0,
        "patience": 50,
        "ema": 0.998,
        "age_head": True,
    },
    # [ours] dlib's face-recognition ResNet (public domain weights, trained on ~3 million
    # faces), fine-tuned with the three heads on dlib's chips of the UTKFace photos
    # (`prepare --size 150 --color --crop dlib`): a few epochs from its weights
    "dlib": {
        "arch": "dlib_resnet",
        "init": "dlib",
        "image_size": 150,
        "channels": 3,
        "epochs": 8,
        "lr": 3e-4,
        "warmup_epochs": 1.0,
        "patience": 50,
        "ema": 0.998,
        "age_head": True,
        "batch_size": 64,
    },
}


def resolve_config(preset: str | None, overrides=()) -> TrainConfig:
    """Default < preset < overrides (``["lr=1e-3", "augment.rotation=5"]`` or a dict)."""
    if not isinstance(overrides, dict):
        overrides = cfgmod.parse_overrides(overrides)
    aug = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("augment.")}
    top = {k: v for k, v in overrides.items() if not k.startswith("augment.")}
    if "augment" in top:
        raise cfgmod.ConfigError("set augmentation fields one by one: augment.KEY=VALUE")
    cfg = cfgmod.resolve(TrainConfig, PRESETS, preset, top)
    return dataclasses.replace(cfg, augment=cfgmod.replace(cfg.augment, aug))


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Inverse of ``config.to_dict`` for :class:`TrainConfig` (nested augment settings)."""
    values = dict(values)
    aug = cfgmod.from_dict(AugmentConfig, values.pop("augment", {}))
    return dataclasses.replace(cfgmod.from_dict(TrainConfig, values), augment=aug)


def resume_settings(
    run_dir: str | Path, overrides=(), data: str | Path | None = None
) -> tuple[TrainConfig, Path]:
    """The settings and data of the run in ``run_dir`` to continue it: its saved config,
    changed by ``overrides`` (e.g. ``["epochs=60"]`` to extend a finished run), and its
    recorded data unless ``data`` is given."""
    cfg_path = Path(run_dir) / "config.json"
    if not cfg_path.exists():
        raise TrainError(f"cannot resume: {cfg_path} not found (not a training run?)")
    try:
        saved = json.loads(cfg_path.read_text())
        cfg = config_from_dict(saved["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TrainError(f"cannot resume: {cfg_path} is not a run's settings ({e})") from None
    if not isinstance(overrides, dict):
        overrides = cfgmod.parse_overrides(overrides)
    if overrides:
        cfg = resolve_config(None, {**_flat(cfgmod.to_dict(cfg)), **overrides})
    data = data or saved.get("data")
    if not data:
        raise TrainError(f"{cfg_path} does not name its data: pass --data")
    return cfg, Path(data)


def _flat(d: dict) -> dict:
    """``{"augment": {"rotation": 8}}`` -> ``{"augment.rotation": 8}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def make_ema(model: torch.nn.Module, decay: float):
    """An exponential moving average of ``model``'s weights and BatchNorm statistics
    (``torch.optim.swa_utils.AveragedModel``; ``update_parameters(model)`` after each
    step), or None when ``decay`` is 0."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def model_config(cfg: TrainConfig) -> ModelConfig:
    heads = {**HEADS, AGE_HEAD: AGE_YEARS} if cfg.age_head else dict(HEADS)
    spec = {"image_size": cfg.image_size, "in_channels": cfg.channels}
    if cfg.arch == "dlib_resnet":  # the pretrained network fixes its input
        if (cfg.image_size, cfg.channels) != (DLIB_INPUT.size, DLIB_INPUT.channels):
            raise ValueError(f"arch dlib_resnet takes {DLIB_INPUT.describe()} faces: set "
                             "image_size=150 channels=3 (the dlib preset does)")  # fmt: skip
        spec = input_settings(DLIB_INPUT)
    return ModelConfig(
        arch=cfg.arch, width=cfg.width, dropout=cfg.dropout, heads=heads,
        blocks=tuple(cfg.blocks), stem_stride=cfg.stem_stride, **spec,
    )  # fmt: skip


def with_age_head(loss_fn, cfg: TrainConfig, edges=None):
    """``loss_fn`` plus ``cfg.age_weight`` x (cross-entropy over the years, smoothed by
    ``cfg.age_smoothing``, + ``cfg.age_l1`` x the L1 error of the expected age, +
    ``cfg.age_bin`` x the cross-entropy over the age bins of inner ``edges``: minus the log
    of the year probabilities summed over the true bin), with ``"age"`` among the parts."""
    from .age.direct import expected_age

    year_bin = None
    if cfg.age_bin > 0:
        if edges is None:
            raise FaceattrsError("age_bin needs the age bins' edges")
        from .age.bins import assign_bins

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


# --------------------------------------------------------------------------- devices


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    NCCL on CUDA, gloo elsewhere. Returns ``(rank, world_size)``; ``(0, 1)`` alone.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


# --------------------------------------------------------------------------- sampling


# --------------------------------------------------------------------------- optimisation


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


def multitask_loss(cfg: TrainConfig, heads=HEADS):
    """L = 0.4 CE(gender) + 2.5 CE(ethnicity) (``cfg.HEAD_weight``, ``cfg.HEAD_smoothing``;
    a head without settings: weight 1, no smoothing). With ``cfg.teachers``, see
    :func:`distill_loss`."""
    weights = {h: getattr(cfg, f"{h}_weight", 1.0) for h in heads}
    smoothing = {h: getattr(cfg, f"{h}_smoothing", 0.0) for h in heads}
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


def load_init(model: FaceResNet, source: str, member: int = 0) -> dict[str, Any]:
    """Copy the weights of ``source`` (``init``: a run folder, an ensemble, "default";
    "dlib": dlib's face-recognition weights into a ``dlib_resnet`` backbone) into
    ``model``, which must have the same design; returns what ``config.json`` records of it."""
    from .bundle import resolve
    from .prepare import file_sha256

    if source == "dlib":
        if model.cfg.arch != "dlib_resnet":
            raise TrainError("init=dlib needs arch=dlib_resnet (the dlib preset)")
        path = default_dat_path()
        model.backbone.load_state_dict(load_dlib_weights(path))
        return {"source": f"dlib:{path.name}", "weights_sha256": file_sha256(path)}

    try:
        bundle = resolve(None if source == "default" else source)
        net, _ = bundle.load_multitask()
    except (FaceattrsError, OSError) as e:
        raise TrainError(f"init {source}: {e}") from None
    nets = list(net.members) if isinstance(net, FaceEnsemble) else [net]
    if member >= len(nets):
        raise TrainError(
            f"init_member={member}, but {source} holds {len(nets)} network(s) (0-{len(nets) - 1})"
        )
    net = nets[member]
    if net.cfg.input != model.cfg.input or net.cfg.stem_stride != model.cfg.stem_stride:
        raise TrainError(
            f"init {source} takes {net.cfg.input.describe()} faces (stem stride "
            f"{net.cfg.stem_stride}); these settings: {model.cfg.input.describe()} (stem stride "
            f"{model.cfg.stem_stride})"
        )
    if net.cfg.width != model.cfg.width or dict(net.cfg.heads) != dict(model.cfg.heads):
        raise TrainError(
            f"init {source} is a network of width {net.cfg.width} with heads "
            f"{', '.join(net.cfg.heads)}; these settings give width {model.cfg.width} with heads "
            f"{', '.join(model.cfg.heads)} (set width= and age_head= to match)"
        )
    try:
        model.load_state_dict(net.state_dict())
    except RuntimeError as e:  # same width and heads, other blocks
        raise TrainError(
            f"init {source} does not fit these settings: {str(e).splitlines()[0]}"
        ) from None
    weights = bundle.checkpoint.with_suffix(".safetensors")
    return {"source": str(bundle.path), "member": member, "weights_sha256": file_sha256(weights)}


def teacher_targets(
    runs: str, images: torch.Tensor, temperature: float, heads=HEADS
) -> dict[str, torch.Tensor]:
    """``{"teacher_HEAD": (N, K) probabilities}``: the mean over the runs (comma-separated
    folders) and over face and mirror of softmax(logits / T), on ``images``' device."""
    from .checkpoint import load_model
    from .model import predict

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


def _teachers_key(cfg: TrainConfig, images: torch.Tensor) -> str | None:
    """What the teachers' targets depend on: the teachers' weights (file hashes), the
    temperature and the training images; None when a teacher's weights cannot be read."""
    import hashlib

    from .prepare import file_sha256

    h = hashlib.sha256(f"faceattrs-teachers-1 T={cfg.distill_temperature!r}".encode())
    try:
        for folder in [r.strip() for r in cfg.teachers.split(",") if r.strip()]:
            h.update(file_sha256(Path(folder) / "best.safetensors").encode())
    except OSError:
        return None  # teacher_targets names the problem
    h.update(np.ascontiguousarray(images.cpu().numpy()))  # hashed in place, no byte copy
    return h.hexdigest()


def _teacher_targets_cached(
    out_dir: Path, cfg: TrainConfig, images: torch.Tensor
) -> tuple[dict[str, torch.Tensor], str | None, bool]:
    """``(targets, key, cached)``: the run folder's ``teachers.safetensors`` when it was
    made from these teachers, temperature and images (a resume), else :func:`teacher_targets`
    (minutes for wide teachers on a CPU)."""
    from safetensors import safe_open

    key = _teachers_key(cfg, images)
    path = out_dir / TEACHERS_FILE
    if key is not None and path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    log.info("teachers' targets read from %s", path)
                    return {k: f.get_tensor(k).to(images.device) for k in f.keys()}, key, True
        except Exception:  # unreadable or foreign: computed again and rewritten
            pass
    return teacher_targets(cfg.teachers, images, cfg.distill_temperature), key, False


def _save_teacher_targets(out_dir: Path, soft: dict[str, torch.Tensor], key: str | None) -> None:
    if key is None:
        return
    state = {k: v.detach().cpu().contiguous() for k, v in soft.items()}
    write_with(out_dir / TEACHERS_FILE, lambda p: save_file(state, str(p), {"key": key}))


# --------------------------------------------------------------------------- resume state

STATE_FILE = "last_state.safetensors"
STATE_FORMAT = "faceattrs-train-state-2"


def save_train_state(
    run_dir: Path,
    epoch: int,
    optimizer,
    scheduler,
    stopper,
    model: torch.nn.Module | None = None,
    record: dict[str, Any] | None = None,
    ema: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Everything a resume needs -> ``last_state.safetensors``, in one atomic write;
    returns the JSON-able part (the caller copies it into ``last.json``, for reading).

    With ``model``, the file is complete on its own (format 2): the model's weights
    (``model.*``), the optimizer's tensors (``optim.PID.NAME``), the weight average's
    state when there is one (``ema.*``), and in its metadata the
    epoch, the scheduler, early-stopping and optimizer settings and ``record`` (history
    rows and checkpoint settings of the epoch). One file replaced in one rename is the
    commit point of an epoch: a kill at any instant leaves the previous epoch's complete
    state or the new one, never a mix (``best``/``last`` are rebuilt from it on resume).
    """
    sd = optimizer.state_dict()
    prefix = "optim." if model is not None else ""
    tensors = {
        f"{prefix}{pid}.{k}": v.detach().to("cpu").contiguous()
        for pid, st in sd["state"].items()
        for k, v in st.items()
        if torch.is_tensor(v)
    }
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    resume = {
        "state_file": STATE_FILE,
        "epoch": epoch,
        "optimizer_param_groups": sd["param_groups"],
        "scheduler": sched,
        "early_stopping": stopper.state_dict(),
    }
    metadata = {"epoch": str(epoch)}
    if model is not None:
        inner = getattr(model, "module", model)  # unwrap DDP / compiled models
        inner = getattr(inner, "_orig_mod", inner)
        tensors.update(
            {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in inner.state_dict().items()}
        )
        if ema is not None:
            tensors.update(
                {f"ema.{k}": v.detach().to("cpu").contiguous() for k, v in ema.state_dict().items()}
            )
        metadata.update(
            format=STATE_FORMAT,
            resume=json.dumps(resume, default=_jsonable),
            record=json.dumps(record or {}, default=_jsonable),
        )
    write_with(run_dir / STATE_FILE, lambda p: save_file(tensors, str(p), metadata=metadata))
    return resume


def read_train_state(run_dir: Path) -> dict[str, Any] | None:
    """A complete (format 2) resume state: ``{"epoch", "resume", "record", "model",
    "optim", "ema"}`` (``ema``: empty without a weight average); None when there is no such file (a run saved before format 2)."""
    from safetensors import SafetensorError, safe_open

    path = run_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            return None
        flat = load_file(str(path))
        resume, record = json.loads(meta["resume"]), json.loads(meta["record"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise TrainError(f"cannot resume: {path} is unreadable ({e})") from None
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        if key.startswith("optim."):
            pid, name = key[len("optim.") :].split(".", 1)
            optim.setdefault(int(pid), {})[name] = v
    model = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
    ema = {k[len("ema.") :]: v for k, v in flat.items() if k.startswith("ema.")}
    return {"epoch": int(meta["epoch"]), "resume": resume, "record": record, "model": model,
            "optim": optim, "ema": ema}  # fmt: skip


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_train_state(run_dir: Path, resume: dict[str, Any], optimizer, scheduler, stopper) -> None:
    """Resume a run saved before format 2 (optimizer tensors only, settings in last.json)."""
    from safetensors import safe_open

    path = run_dir / resume["state_file"]
    if not path.exists():
        raise TrainError(f"cannot resume: {path} is missing")
    with safe_open(str(path), framework="pt") as f:
        saved_epoch = int((f.metadata() or {}).get("epoch", -1))
    if saved_epoch != resume["epoch"]:
        raise TrainError(
            f"cannot resume: {path} is from epoch {saved_epoch}, last.json from epoch "
            f"{resume['epoch']} (interrupted while saving)"
        )
    flat = load_file(str(path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": resume["optimizer_param_groups"]})
    scheduler.load_state_dict(
        {**resume["scheduler"], "lr_lambdas": scheduler.state_dict()["lr_lambdas"]}
    )
    stopper.load_state_dict(resume["early_stopping"])


# --------------------------------------------------------------------------- history


# three-head runs only: the age head's training loss, validation MAE and CS@5
AGE_COLUMNS = (f"train_loss_{AGE_HEAD}", f"val_{AGE_HEAD}_mae", f"val_{AGE_HEAD}_cs5")


def history_fields(heads=HEADS, age: bool = False) -> list[str]:
    """Columns of ``history.csv``: per epoch, losses and validation scores of every head;
    ``age``: also the age head's training loss and its validation MAE and CS@5 (median of
    its years, unclipped)."""
    return [
        "epoch", "lr", "seconds", "images_per_s", "train_loss",
        *(f"train_loss_{h}" for h in heads), "val_loss",
        *(f"val_{h}_{m}" for h in heads for m in ("accuracy", "macro_f1")), "val_score",
        *(AGE_COLUMNS if age else ()),
    ]  # fmt: skip


HISTORY_FIELDS = history_fields()


def _fields(rows: list[dict]) -> list[str]:
    """The columns for these history rows (with the age columns when any row has them)."""
    return history_fields(HEADS, age=any(AGE_COLUMNS[1] in r for r in rows))


# --------------------------------------------------------------------------- fit


def _split_tensors(
    faces: FaceSet, split: str, limit: int, seed: int, device, age: bool = False
) -> dict:
    """Images and one label tensor per head (the FaceSet attribute of that name), and the
    ages in whole years (clipped to the age head's range) when ``age``."""
    idx = faces.indices(split)
    if limit and len(idx) > limit:
        rng = np.random.default_rng(mix_seed(seed, 3))
        idx = np.sort(rng.choice(idx, limit, replace=False))
    labels = {h: getattr(faces, h)[idx].astype(np.int64) for h in HEADS}
    if age:
        labels[AGE_HEAD] = np.clip(faces.age[idx].astype(np.int64), 0, AGE_YEARS - 1)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(faces.images[idx])).to(device),
        **{h: torch.from_numpy(v).to(device) for h, v in labels.items()},
    }


def fit(
    faces: FaceSet,
    out_dir: str | Path,
    cfg: TrainConfig,
    resume: bool = False,
    data_ref: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on the ``train`` split, choose the best epoch on ``val``, write ``out_dir``.

    With ``resume=True`` the run continues after the epoch saved in ``last.json``; the
    per-epoch seeding makes the result identical to an uninterrupted run (same device).
    Under ``torchrun`` every rank trains on its share and only rank 0 writes.
    Returns ``{"best_epoch", "best_score", "epochs_run", "stopped_early", ...}``.
    """
    out_dir = Path(out_dir)
    check_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _fit(faces, out_dir, cfg, resume, data_ref, progress)
    finally:
        torch.set_num_threads(threads)
        if (out_dir / "history.csv").exists() and _rank() == 0:
            _plot(out_dir)  # also after an interruption


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _fit(faces, out_dir: Path, cfg: TrainConfig, resume, data_ref, progress) -> dict[str, Any]:
    device = select_device(cfg.device)
    rank, world = init_distributed(device)
    bf16 = use_bf16(cfg.bf16, device)
    main = rank == 0

    try:
        faces.require(model_config(cfg).input, data_ref or "the data")
    except FaceattrsError as e:
        raise TrainError(str(e)) from None
    train = _split_tensors(faces, "train", cfg.limit, cfg.seed, device, cfg.age_head)
    val = _split_tensors(faces, "val", cfg.limit, cfg.seed + 1, device, cfg.age_head)
    n_train, n_val = len(train["image"]), len(val["image"])
    if n_train < world or n_val == 0:
        raise TrainError(
            f"need a train and a val split (found {n_train} train, {n_val} val faces); "
            "pass data prepared by `faceattrs prepare`"
        )
    if cfg.teachers:
        log.info("distilling from %s (T=%s, weight %s)", cfg.teachers, cfg.distill_temperature,
                 cfg.distill_weight)  # fmt: skip
        soft, teachers_key, cached = _teacher_targets_cached(out_dir, cfg, train["image"])
        train.update(soft)
    eth_train = train["ethnicity"].cpu().numpy()
    minority = minority_classes(eth_train, cfg.augment.minority_ratio)
    augmenter = Augmenter(cfg.augment, minority, model_config(cfg).input).to(device)
    weights = sampler_weights(eth_train) if cfg.balanced else None

    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_model(model_config(cfg)).to(device)
    init = None
    if cfg.init and not resume:  # a resume reads its own weights back
        init = load_init(model, cfg.init, cfg.init_member)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    share = n_train // world
    steps = math.ceil(share / cfg.batch_size)
    if cfg.max_batches > 0:
        steps = min(steps, cfg.max_batches)
    scheduler = make_scheduler(
        optimizer, max(1, round(cfg.warmup_epochs * steps)), cfg.epochs * steps, cfg.min_lr / cfg.lr
    )
    stopper = EarlyStopping("val_score", "max", cfg.patience, cfg.min_delta)
    loss_fn = multitask_loss(cfg)
    age_edges = None
    if cfg.age_head:  # the bins calibrate gives the age head: training-age sextiles
        from .age.bins import quantile_edges

        age_edges = [float(e) for e in quantile_edges(train[AGE_HEAD].cpu().numpy(), 6)]
        loss_fn = with_age_head(loss_fn, cfg, age_edges)
    ema = make_ema(model, cfg.ema)
    served = ema.module if ema is not None else model  # evaluated, saved as best/last

    start_epoch, history = 1, []
    if main:
        clean_stale_temps(out_dir)  # of a killed run
    if resume:
        start_epoch, history = _resume(out_dir, model, optimizer, scheduler, stopper, main, ema)
    else:
        _check_fresh(out_dir)
    run_config = {"data": data_ref, "data_key": data_key(data_ref) if data_ref else None,
                  "world_size": world, "bf16": bf16, "device": str(device),
                  "minority_classes": list(minority), "train_faces": n_train, "val_faces": n_val,
                  "config": cfgmod.to_dict(cfg)}  # fmt: skip
    if resume:  # where the first weights came from, as the fresh run recorded it
        init = json.loads((out_dir / "config.json").read_text()).get("init")
    if init:
        run_config["init"] = init
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "config.json", run_config)
        if cfg.teachers and not cached:  # a resume reads them back instead of recomputing
            _save_teacher_targets(out_dir, soft, teachers_key)
    log.info(
        "training %d %s faces (val %d) on %s x%d, bf16=%s, width=%s, blocks=%s, epochs %d-%d, "
        "minority=%s", n_train, model.cfg.input.describe(), n_val, device, world, bf16, cfg.width,
        ",".join(map(str, cfg.blocks)), start_epoch, cfg.epochs, minority,
    )  # fmt: skip

    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)

    def prepare(batch):
        return augmenter(batch["image"], batch["ethnicity"])

    t0 = time.perf_counter()
    evals: dict[int, dict] = {}  # this session's validation results, by epoch

    def epoch_fn(epoch: int) -> dict[str, Any]:
        t_epoch = time.perf_counter()
        seed_epoch(cfg.seed, epoch, rank)
        order = epoch_order(weights, n_train, cfg.seed, epoch, rank, world).to(device)
        tr = train_one_epoch(
            net, loss_fn, train, order, optimizer, prepare,
            batch_size=cfg.batch_size, scheduler=scheduler, bf16=bf16,
            channels_last=cfg.channels_last, max_batches=cfg.max_batches,
            progress=f"epoch {epoch}/{cfg.epochs}" if (progress and main) else False,
            after_step=(lambda: ema.update_parameters(model)) if ema is not None else None,
        )  # fmt: skip
        lr = scheduler.get_last_lr()[0]  # the lr of the epoch's last step
        if world > 1:  # every rank evaluates (its shard) with rank 0's BatchNorm statistics
            for buf in served.buffers():
                dist.broadcast(buf, 0)
        shard = torch.arange(rank, n_val, world, device=device)
        ev = evaluate_heads(
            served, val, HEADS, batch_size=cfg.eval_batch_size, loss_fn=loss_fn, bf16=bf16,
            channels_last=cfg.channels_last, indices=shard,
            years=AGE_HEAD if cfg.age_head else None,
        )  # fmt: skip
        evals[epoch] = ev
        seconds = time.perf_counter() - t_epoch
        score = sum(ev[h]["macro_f1"] for h in HEADS) / len(HEADS)
        return {
            "epoch": epoch, "lr": lr, "seconds": seconds, "images_per_s": tr["images_per_s"],
            "train_loss": tr["loss"], **{f"train_loss_{h}": tr[f"loss_{h}"] for h in HEADS},
            "val_loss": ev["loss"], "val_score": score,
            **{f"val_{h}_{m}": ev[h][m] for h in HEADS for m in ("accuracy", "macro_f1")},
            **(dict(zip(AGE_COLUMNS, (tr[f"loss_{AGE_HEAD}"], ev[AGE_HEAD]["mae"],
                                      ev[AGE_HEAD]["cs5"]), strict=True)) if cfg.age_head else {}),
        }  # fmt: skip

    def on_epoch(row: dict[str, Any], improved: bool) -> None:
        epoch, score, ev = row["epoch"], row["val_score"], evals[row["epoch"]]
        history.append(row)
        age = f"  age MAE {ev[AGE_HEAD]['mae']:.2f}" if cfg.age_head else ""
        log.info(
            "epoch %d/%d  loss %.4f  val %s%s  score %.4f%s  %.0f img/s  %.0f s",
            epoch, cfg.epochs, row["train_loss"],
            "  ".join(f"{h} F1 {ev[h]['macro_f1']:.4f}" for h in HEADS), age, score,
            "  *best*" if improved else "", row["images_per_s"], row["seconds"],
        )  # fmt: skip
        if main:
            monitor = f"val mean macro-F1 ({', '.join(HEADS)})"
            meta = {"epoch": epoch, "score": score, "monitor": monitor,
                    "val": {h: {k: ev[h][k] for k in ("accuracy", "macro_f1", "confusion")}
                            for h in HEADS},
                    "data": data_ref, "config": cfgmod.to_dict(cfg)}  # fmt: skip
            if cfg.age_head:  # the bins calibrate gives the age head: training-age sextiles
                meta["age_edges"] = age_edges
            _save_epoch(out_dir, epoch, model, optimizer, scheduler, stopper, meta, history,
                        improved, ema)  # fmt: skip
            if row["seconds"] >= 30:  # keep history.png current when it costs little
                _plot(out_dir)

    epochs = range(start_epoch, cfg.epochs + 1)
    stopped_early = run_epochs(epochs, epoch_fn, stopper, on_epoch)
    if stopped_early:
        log.info("early stop: no gain for %d epochs, best epoch %d", cfg.patience,
                 stopper.best_epoch)  # fmt: skip

    summary = {
        "best_epoch": stopper.best_epoch, "best_score": stopper.best,
        "epochs_run": len(history), "stopped_early": stopped_early,
        "seconds": time.perf_counter() - t0, "out_dir": str(out_dir), "bf16": bf16,
        "device": str(device), "world_size": world,
    }  # fmt: skip
    if world > 1:
        dist.barrier()
    return summary


# --------------------------------------------------------------------------- crash-consistent saving


def _save_epoch(
    out_dir, epoch, model, optimizer, scheduler, stopper, meta, history, improved, ema=None
):
    """Write an epoch's files so that a kill at any instant leaves a resumable run.

    1. ``last_state.safetensors``: the complete resume state (weights, optimizer, weight
       average, history, settings) in one atomic write: the epoch's commit point;
    2. ``history.csv``, ``best`` (when improved) and ``last``: derived from it; each
       checkpoint's JSON is removed first and written last, so a reader never pairs one
       epoch's JSON with another's weights. A kill among them is repaired on resume.
       With a weight average (``ema``), the checkpoints hold the average, the model that
       was evaluated.
    """
    record = {"history": history, "meta": meta}
    resume = save_train_state(out_dir, epoch, optimizer, scheduler, stopper, model, record, ema)
    write_history(out_dir / "history.csv", history, _fields(history))
    served = ema.module if ema is not None else model
    if improved:
        _save_pair(out_dir, "best", served, {**meta, "kind": "best"})
    _save_pair(out_dir, "last", served, {**meta, "kind": "last", "resume": resume})


def _save_pair(out_dir: Path, name: str, model, meta: dict) -> None:
    (out_dir / f"{name}.json").unlink(missing_ok=True)
    save_checkpoint(out_dir, name, model, meta)


def _json_epoch(path: Path) -> int | None:
    try:
        return int(read_meta(path)["epoch"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def _check_fresh(out_dir: Path) -> None:
    held = ("last.json", "best.json", STATE_FILE)
    if any((out_dir / name).exists() for name in held):
        raise TrainError(
            f"{out_dir} already holds a run: continue it with --resume {out_dir}, "
            "or choose another --out"
        )


def _resume(
    out_dir: Path, model, optimizer, scheduler, stopper, main: bool = True, ema=None
) -> tuple[int, list[dict]]:
    """Load the saved state into the objects; returns (first epoch to run, history so far).

    From a complete state file (format 2), the files derived from it that a kill left
    behind (``history.csv``, ``best``, ``last``) are rewritten first.
    """
    snap = read_train_state(out_dir)
    if snap is not None:
        model.load_state_dict(snap["model"])
        resume = snap["resume"]
        optimizer.load_state_dict(
            {"state": snap["optim"], "param_groups": resume["optimizer_param_groups"]}
        )
        scheduler.load_state_dict(
            {**resume["scheduler"], "lr_lambdas": scheduler.state_dict()["lr_lambdas"]}
        )
        stopper.load_state_dict(resume["early_stopping"])
        if (ema is not None) != bool(snap["ema"]):
            raise TrainError(
                f"cannot resume {out_dir}: it was trained {'with' if snap['ema'] else 'without'}"
                " a weight average (ema); keep its ema setting"
            )
        served = model
        if ema is not None:
            ema.load_state_dict(snap["ema"])
            served = ema.module
        epoch, rows, meta = snap["epoch"], snap["record"]["history"], snap["record"]["meta"]
        if main:
            write_history(out_dir / "history.csv", rows, _fields(rows))
            if stopper.best_epoch == epoch and _json_epoch(out_dir / "best.json") != epoch:
                log.info("rebuilding best (epoch %d) from the saved state", epoch)
                _save_pair(out_dir, "best", served, {**meta, "kind": "best"})
            if _json_epoch(out_dir / "last.json") != epoch:
                log.info("rebuilding last (epoch %d) from the saved state", epoch)
                _save_pair(out_dir, "last", served, {**meta, "kind": "last", "resume": resume})
        log.info("resuming %s after epoch %d (best %s at epoch %d)", out_dir, epoch,
                 stopper.best, stopper.best_epoch)  # fmt: skip
        return epoch + 1, rows
    if ema is not None:
        raise TrainError(f"cannot resume {out_dir} with a weight average: its state is too old")
    try:
        meta = read_meta(out_dir / "last.json")
    except CheckpointError as e:
        raise TrainError(f"cannot resume {out_dir}: {e}") from None
    resume = meta.get("resume")
    if not resume:
        raise TrainError(f"cannot resume: {out_dir / 'last.json'} holds no resume state")
    state = load_file(str(out_dir / "last.safetensors"), device="cpu")
    model.load_state_dict(state)
    load_train_state(out_dir, resume, optimizer, scheduler, stopper)
    epoch = int(resume["epoch"])
    rows = [
        {k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v != ""}
        for r in read_history(out_dir / "history.csv")
    ]
    rows = [r for r in rows if r["epoch"] <= epoch]
    log.info("resuming %s after epoch %d (best %s at epoch %d)", out_dir, epoch, stopper.best,
             stopper.best_epoch)  # fmt: skip
    return epoch + 1, rows


def _plot(out_dir: Path) -> None:
    try:
        from .plots.train import plot_history

        plot_history(out_dir / "history.csv", out_dir / "history.png")
    except Exception as e:  # a figure must never stop a training run
        log.warning("history plot failed: %s", e)
