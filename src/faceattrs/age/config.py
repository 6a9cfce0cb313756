"""Settings of the age stage (``faceattrs train-age``): one dataclass, named presets.

``paper`` follows the reference (six bins, head-only training then full fine-tuning,
early stopping on validation macro-F1, one regressor per bin); ``cpu`` shortens every
schedule so that the whole stage runs in well under an hour on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import config as cfgmod


@dataclass
class AgeConfig:
    # Bins
    n_bins: int = 6  # coarse age bins of about equal size (training-age quantiles)
    edges: tuple[float, ...] = ()  # explicit inner edges, e.g. 16,26,29,37,53; () = quantiles
    min_age: float = 1.0  # predictions and training targets are clipped to [min_age, max_age]
    max_age: float = 100.0
    # Fine-tuning from the multitask backbone (coarse classifier and direct head alike)
    batch_size: int = 128  # training batch size
    head_epochs: int = 3  # stage 1: only the new head trains, the backbone is frozen
    head_lr: float = 1e-3  # stage 1 learning rate (AdamW)
    finetune_epochs: int = 20  # stage 2: the whole network trains
    finetune_lr: float = 1e-4  # stage 2 learning rate: lower, the backbone is already trained
    warmup_epochs: int = 1  # stage 2 linear warm-up before the cosine schedule
    weight_decay: float = 1e-3  # AdamW weight decay (as the multitask model)
    label_smoothing: float = 0.0  # coarse classifier cross-entropy label smoothing
    patience: int = 5  # early stopping patience (epochs) in stage 2
    min_delta: float = 1e-3  # smallest improvement that resets the patience
    max_batches: int = 0  # stop each epoch after this many batches (0 = all; for smoke tests)
    channels_last: bool = True  # memory format of model and inputs (as the multitask trainer)
    # Per-bin regressors on the frozen coarse embeddings
    reg_hidden: int = 128  # hidden units of each regressor
    reg_dropout: float = 0.1  # dropout inside each regressor
    reg_loss: str = "huber"  # "huber" or "l1", in years
    huber_delta: float = 2.0  # Huber transition point, years
    reg_epochs: int = 200  # maximum epochs per regressor (early-stopped on its bin's val MAE)
    reg_lr: float = 1e-3  # regressor learning rate (AdamW)
    reg_weight_decay: float = 1e-4  # regressor weight decay
    reg_patience: int = 20  # regressor early-stopping patience (epochs)
    reg_batch_size: int = 256  # regressor batch size
    clip_to_bin: bool = True  # clamp each regressor's output to its bin's training-age range
    # The alternative: a direct age head on the same backbone
    direct: bool = True  # also train the direct head and compare
    direct_loss: str = "dldl"  # "dldl" (label distribution + L1 on the mean) or "mean_variance"
    direct_sigma: float = 2.0  # std (years) of the Gaussian label distribution (dldl)
    direct_mean_weight: float = 1.0  # weight of the expectation term (L1 for dldl, L2 for mv)
    direct_var_weight: float = 0.05  # weight of the variance term (mean_variance only)
    # Inference
    flip_tta: str = "auto"  # average face and mirror image: auto (when val MAE is lower), on, off
    # Run
    seed: int = 0  # seeds every random choice (init, batches, augmentation)
    eval_batch_size: int = 512  # batch size for embeddings and evaluation

    def __post_init__(self):  # every setting's valid range, checked before any work
        c = cfgmod.check_range
        c(self, "n_bins", 2)
        c(self, "min_age", 0)
        c(self, "max_age", self.min_age, low_open=True)
        for key in ("batch_size", "reg_epochs", "reg_batch_size", "eval_batch_size", "reg_hidden"):
            c(self, key, 1)
        for key in ("patience", "reg_patience"):
            c(self, key, 1)
        for key in ("head_epochs", "finetune_epochs", "warmup_epochs", "max_batches", "min_delta"):
            c(self, key, 0)
        for key in ("weight_decay", "reg_weight_decay", "direct_mean_weight", "direct_var_weight"):
            c(self, key, 0)
        for key in ("head_lr", "finetune_lr", "reg_lr", "huber_delta", "direct_sigma"):
            c(self, key, 0, low_open=True)
        for key in ("label_smoothing", "reg_dropout"):
            c(self, key, 0, 1, high_open=True)
        cfgmod.check_choice(self, "reg_loss", ("huber", "l1"))
        cfgmod.check_choice(self, "direct_loss", ("dldl", "mean_variance"))
        cfgmod.check_choice(self, "flip_tta", ("auto", "on", "off"))
        if self.head_epochs + self.finetune_epochs < 1:
            raise cfgmod.ConfigError("head_epochs + finetune_epochs must be at least 1")
        edges = list(self.edges)
        if any(not (b > a) for a, b in zip(edges, edges[1:], strict=False)):
            raise cfgmod.ConfigError(f"setting 'edges' must increase, got {edges}")


PRESETS: dict[str, dict] = {
    # the reference's two stages; its epochs are not stated: ours, patience as the multitask model
    # (no test-time flip: the reference has none)
    "paper": {"head_epochs": 5, "finetune_epochs": 30, "patience": 8, "flip_tta": "off"},
    # two CPU cores, ~14 min for the whole stage on a width-0.125 backbone: one head-only
    # epoch and six fine-tuning epochs per model (2 -> 6 epochs: validation MAE 10.7 -> 9.1),
    # larger batches (learning rates scaled with them), shorter regressor schedules
    "cpu": {
        "head_epochs": 1,
        "finetune_epochs": 6,
        "warmup_epochs": 0,
        "batch_size": 256,
        "head_lr": 2e-3,
        "finetune_lr": 2e-4,
        "patience": 3,
        "reg_epochs": 100,
        "reg_patience": 10,
    },
}
