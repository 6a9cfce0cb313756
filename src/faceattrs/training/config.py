"""The settings of a training run: :class:`TrainConfig` (one field per setting, checked
when made), the named ``PRESETS``, :func:`resolve_config` (default < preset < overrides),
:func:`config_from_dict` and :func:`resume_settings` (a run's saved settings, to continue
it), and :func:`model_config` (the network a config trains).

The heads are data: ``TrainConfig.heads`` holds one :class:`HeadSpec` per classification
head (name, class names, loss weight, smoothing, whether it counts in the selection
score); ``age_head=true`` adds the age head, a spec of kind ``age``
(:func:`train_heads`). A head is changed, or added, on the command line as
``heads.NAME.KEY=VALUE``; ``gender_weight=`` and the other flat names of older versions
still set the spec (and older runs' saved settings still load).

>>> cfg = resolve_config(None, ["heads.smile.classes=no,yes", "heads.smile.weight=0.5",
...                             "ethnicity_smoothing=0"])
>>> [(h.name, h.weight, h.smoothing, h.selects) for h in cfg.heads]
[('gender', 0.4, 0.0, True), ('ethnicity', 2.5, 0.0, True), ('smile', 0.5, 0.0, True)]
>>> [h.name for h in train_heads(resolve_config(None, ["age_head=true"]))]
['gender', 'ethnicity', 'age']
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as cfgmod
from ..age.direct import HEAD as AGE_HEAD
from ..augment import AugmentConfig
from ..devices import check_device_name
from ..dlib_resnet import INPUT as DLIB_INPUT
from ..exceptions import FaceattrsError
from ..inputs import DEFAULT_HEADS, ETHNICITIES, GENDERS
from ..model import ModelConfig, input_settings

# head -> number of classes, from the input contract; a checkpoint records its own
HEADS = {h: len(names) for h, names in DEFAULT_HEADS.items()}
AGE_YEARS = 117  # the age head's classes: whole years 0..116 (UTKFace's range)
BF16_WORDS = ("auto", "on", "off", "true", "false", "1", "0", "yes", "no")
HEAD_KINDS = ("classes", "age")
FREEZE = ("", "backbone")  # TrainConfig.freeze's values


class TrainError(FaceattrsError):
    """A training run that cannot start or resume (bad data, missing run folder)."""


@dataclass(frozen=True)
class HeadSpec:
    """One head the network trains, its labels the data array of its ``name``.

    ``kind`` ``classes``: cross-entropy over ``classes`` (the label is the class index),
    scored by accuracy and macro-F1; ``age``: the age head (whole years 0..116, the label
    the age), set by ``age_head=true`` and its ``age_*`` settings, scored by MAE."""

    name: str
    kind: str = "classes"  # classes | age
    classes: tuple[str, ...] = ()  # class names, in label order (at least two)
    weight: float = 1.0  # its term's weight in the loss
    smoothing: float = 0.0  # label smoothing of its cross-entropy, in [0, 1)
    selects: bool = True  # its macro-F1 counts in the selection score (best epoch)

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        where = f"head {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise cfgmod.ConfigError(
                f"a head's name must be a word (letters, digits, _), got {self.name!r}"
            )
        if self.kind not in HEAD_KINDS:
            raise cfgmod.ConfigError(f"{where}: kind must be classes or age, got {self.kind!r}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise cfgmod.ConfigError(
                f"{where}: give at least two distinct class names "
                f"(heads.{self.name}.classes=NAME,NAME), got {list(self.classes)}"
            )
        if self.kind == "age" and self.selects:
            raise cfgmod.ConfigError(f"{where}: an age head has no macro-F1 to select on")
        try:
            cfgmod.check_range(self, "weight", 0)
            cfgmod.check_range(self, "smoothing", 0, 1, high_open=True)
        except cfgmod.ConfigError as e:
            raise cfgmod.ConfigError(f"{where}: {e}") from None

    @property
    def n_classes(self) -> int:
        return len(self.classes)


# the reference's heads: L = 0.4 CE(gender) + 2.5 CE(ethnicity, smoothing 0.12); the best
# epoch has the highest mean of their macro-F1s on validation
REFERENCE_HEADS = (
    HeadSpec("gender", classes=GENDERS, weight=0.4),
    HeadSpec("ethnicity", classes=ETHNICITIES, weight=2.5, smoothing=0.12),
)
# older versions' flat settings of the reference's heads -> (head, spec field)
HEAD_ALIASES = {f"{h}_{key}": (h, key) for h in ("gender", "ethnicity")
                for key in ("weight", "smoothing")}  # fmt: skip


def _head_spec(value, where: str = "heads") -> HeadSpec:
    """A :class:`HeadSpec` from itself or its dict (a saved config); unknown keys: one line."""
    if isinstance(value, HeadSpec):
        return value
    if not isinstance(value, dict):
        raise cfgmod.ConfigError(f"setting {where!r}: each head is a dict of its settings")
    known = {f.name for f in dataclasses.fields(HeadSpec)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise cfgmod.ConfigError(
            f"unknown head setting {unknown[0]!r}; known: {', '.join(sorted(known))}"
        )
    if "name" not in value:
        raise cfgmod.ConfigError(f"setting {where!r}: a head needs a name")
    hints = typing.get_type_hints(HeadSpec)
    return HeadSpec(**{k: cfgmod.coerce(v, hints[k], f"heads.{value['name']}.{k}")
                       for k, v in value.items()})  # fmt: skip


@dataclass
class TrainConfig:
    """Settings of one training run. Defaults = the reference (the ``paper`` preset)."""

    epochs: int = 50  # maximum epochs; early stopping may end sooner
    batch_size: int = 128  # [ours] the reference does not state it
    lr: float = 6e-4  # AdamW peak learning rate
    weight_decay: float = 1e-3  # AdamW decoupled weight decay, on every parameter
    warmup_epochs: float = 5.0  # linear warm-up from ~0 to lr, then cosine to min_lr
    min_lr: float = 0.0  # floor of the cosine
    # the classification heads (HeadSpec: name, classes, loss weight, smoothing, selects);
    # the reference's two by default. Override as heads.NAME.KEY=VALUE (a new NAME with
    # its classes adds a head); gender_weight= and the like still set the reference's
    heads: tuple[HeadSpec, ...] = REFERENCE_HEADS
    patience: int = 8  # early stopping on the mean macro-F1 (heads that select) on val
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
    freeze: str = ""  # [ours] "" = every weight trains; "backbone" = only the heads train
    # (the backbone's weights fixed, out of the optimiser, in eval mode: its BatchNorm
    # statistics fixed too). With augment.enabled=false its features are computed once
    # per split and the epochs run the heads alone on them (the dlib-heads preset)
    limit: int = 0  # use at most this many faces per split (0 = all; smoke tests)
    max_batches: int = 0  # stop each epoch after this many batches (0 = full; smoke tests)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # override as augment.KEY

    def __post_init__(self):  # every setting's valid range, checked before any work
        heads = self.heads
        if not isinstance(heads, list | tuple) or not heads:
            raise cfgmod.ConfigError("setting 'heads' must list at least one head")
        self.heads = tuple(_head_spec(h) for h in heads)
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise cfgmod.ConfigError(f"setting 'heads': a head named twice ({', '.join(names)})")
        for h in self.heads:
            if h.kind != "classes" or h.name == AGE_HEAD:
                raise cfgmod.ConfigError(
                    f"head {h.name!r}: the age head is set by age_head=true (and age_weight, "
                    "age_smoothing, ...), not in heads"
                )
        if not any(h.selects for h in self.heads):
            raise cfgmod.ConfigError("setting 'heads': at least one head must select "
                                     "(heads.NAME.selects=true)")  # fmt: skip
        c = cfgmod.check_range
        for key in ("epochs", "batch_size", "eval_batch_size", "patience"):
            c(self, key, 1)
        for key in ("threads", "limit", "max_batches", "warmup_epochs", "min_lr", "min_delta",
                    "init_member"):  # fmt: skip
            c(self, key, 0)
        for key in ("weight_decay", "age_bin"):
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
        for key in ("ema", "distill_weight", "dropout", "age_smoothing"):
            c(self, key, 0, 1, high_open=True)
        if self.freeze not in FREEZE:
            raise cfgmod.ConfigError(
                f"setting 'freeze' must be backbone (only the heads train) or empty (every "
                f"weight trains), got {self.freeze!r}"
            )
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
    # (`prepare --size 150 --color --crop dlib`): two epochs at a low rate, the second stage
    # of the default model (its first: the dlib-heads preset below, the heads trained on
    # the frozen network; pass that run as init=RUN; init=dlib starts the heads at random).
    # At lr 3e-4 from random heads the first epoch lost most of dlib's features (validation
    # score 0.736 against 0.853 here): docs/results/trials.md
    "dlib": {
        "arch": "dlib_resnet",
        "init": "dlib",
        "image_size": 150,
        "channels": 3,
        "epochs": 2,
        "lr": 3e-5,
        "warmup_epochs": 0.2,
        "patience": 50,
        "ema": 0.0,
        "age_head": True,
        "batch_size": 64,
    },
}
# [ours] the first stage of the default model: the three heads on dlib's frozen network
# (freeze=backbone; no augmentation, so its 128-d descriptors are computed once per split
# and the epochs run the heads alone), 40 epochs at a constant lr of 3e-3 (no warm-up, no
# cosine) in batches of 128, plain shuffling, fp32: what the trial that made v6's first
# stage did (docs/training.md, "dlib's network in stages"). Its run is the dlib
# preset's init=RUN
PRESETS["dlib-heads"] = {
    **PRESETS["dlib"],
    "freeze": "backbone",
    "augment": AugmentConfig(enabled=False),
    "epochs": 40,
    "lr": 3e-3,
    "warmup_epochs": 0.0,
    "min_lr": 3e-3,
    "batch_size": 128,
    "balanced": False,
    "bf16": "off",
}


def resolve_config(preset: str | None, overrides=()) -> TrainConfig:
    """Default < preset < overrides (``["lr=1e-3", "augment.rotation=5"]`` or a dict;
    ``heads.NAME.KEY=VALUE`` sets one head's setting, or adds head NAME given its
    ``classes``; ``gender_weight=`` and the like set the reference's heads)."""
    if not isinstance(overrides, dict):
        overrides = cfgmod.parse_overrides(overrides)
    aug = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("augment.")}
    head_sets = _head_overrides(overrides)
    top = {k: v for k, v in overrides.items()
           if not k.startswith(("augment.", "heads.")) and k not in HEAD_ALIASES}  # fmt: skip
    if "augment" in top:
        raise cfgmod.ConfigError("set augmentation fields one by one: augment.KEY=VALUE")
    if isinstance(top.get("heads"), str):
        raise cfgmod.ConfigError("set heads' settings one by one: heads.NAME.KEY=VALUE")
    cfg = cfgmod.resolve(TrainConfig, PRESETS, preset, top)
    if head_sets:
        cfg = dataclasses.replace(cfg, heads=_set_heads(cfg.heads, head_sets))
    return dataclasses.replace(cfg, augment=cfgmod.replace(cfg.augment, aug))


def _head_overrides(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"heads.smile.weight": "2", "gender_weight": 0.5}`` -> ``{"smile": {"weight":
    "2"}, "gender": {"weight": 0.5}}``, in the order given."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key in HEAD_ALIASES:
            head, field_name = HEAD_ALIASES[key]
        elif key.startswith("heads."):
            parts = key.split(".")
            if len(parts) != 3 or not all(parts[1:]):
                raise cfgmod.ConfigError(f"override {key!r}: set a head as heads.NAME.KEY=VALUE")
            head, field_name = parts[1], parts[2]
        else:
            continue
        out.setdefault(head, {})[field_name] = value
    return out


def _set_heads(heads, changes: dict[str, dict[str, Any]]) -> tuple[HeadSpec, ...]:
    """``heads`` with ``changes`` applied per head; a name not among them is a new head."""
    by_name = {h.name: cfgmod.to_dict(h) for h in heads}
    for name, change in changes.items():
        by_name[name] = {**by_name.get(name, {"name": name}), **change, "name": name}
    return tuple(_head_spec(v) for v in by_name.values())


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Inverse of ``config.to_dict`` for :class:`TrainConfig` (nested augment settings);
    the flat head settings of older runs (``gender_weight``, ...) set the heads."""
    values = dict(values)
    aug = cfgmod.from_dict(AugmentConfig, values.pop("augment", {}))
    legacy = {k: values.pop(k) for k in list(values) if k in HEAD_ALIASES}
    cfg = cfgmod.from_dict(TrainConfig, values)
    if legacy:
        cfg = dataclasses.replace(cfg, heads=_set_heads(cfg.heads, _head_overrides(legacy)))
    return dataclasses.replace(cfg, augment=aug)


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
    """``{"augment": {"rotation": 8}}`` -> ``{"augment.rotation": 8}`` (``heads``, a list
    of dicts, stays whole)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def train_heads(cfg: TrainConfig) -> tuple[HeadSpec, ...]:
    """Every head ``cfg`` trains, in the network's order: ``cfg.heads``, then the age head
    (kind ``age``: weight ``age_weight``, smoothing ``age_smoothing``) with ``age_head``."""
    if not cfg.age_head:
        return cfg.heads
    years = tuple(str(y) for y in range(AGE_YEARS))
    age = HeadSpec(AGE_HEAD, "age", years, cfg.age_weight, cfg.age_smoothing, selects=False)
    return (*cfg.heads, age)


def class_heads(cfg: TrainConfig) -> dict[str, int]:
    """``{name: number of classes}`` of the classification heads (not the age head)."""
    return {h.name: h.n_classes for h in cfg.heads}


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The network ``cfg`` trains: its design, heads (:func:`train_heads`) and input
    contract."""
    heads = {h.name: h.n_classes for h in train_heads(cfg)}
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
